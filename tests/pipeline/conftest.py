from tests.net.conftest import node, node_settings  # noqa: F401
