"""The node's copy of its presentation contexts for each association (net.server)."""

from __future__ import annotations

import copy

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, transport
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from medzip_scp.net.server import _copy_contexts, configure_pynetdicom
from tests.helpers.node import ProcessWideSettings


def _contexts() -> list:  # type: ignore[type-arg]
    ae = AE()
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    ae.add_supported_context(MRImageStorage, ALL_TRANSFER_SYNTAXES[:3])
    return ae.supported_contexts


def test_copy_equals_a_deep_copy_and_is_independent() -> None:
    originals = _contexts()
    copies = _copy_contexts(originals)
    assert [vars(c) for c in copies] == [vars(c) for c in copy.deepcopy(originals)]
    copies[0].transfer_syntax = copies[0].transfer_syntax[:1]  # as the node reorders them
    copies[1].context_id = 7
    assert [vars(c) for c in originals] == [vars(c) for c in _contexts()]


def test_anything_else_is_deep_copied() -> None:
    nested = {"a": [1, [2]]}
    twin = _copy_contexts(nested)
    twin["a"][1].append(3)
    assert nested == {"a": [1, [2]]}


def test_the_node_installs_it_in_pynetdicoms_transport() -> None:
    before = transport.deepcopy
    with ProcessWideSettings():
        configure_pynetdicom()
        assert transport.deepcopy is _copy_contexts
    assert transport.deepcopy is before  # the test leaves it as it found it
