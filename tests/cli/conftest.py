# The running-node fixtures live with the network tests; the CLI tests reuse them.
from tests.net.conftest import node, node_settings  # noqa: F401
from tests.net.test_query_retrieve import store_scp  # noqa: F401
from tests.net.tls_helpers import pki  # noqa: F401
