"""Key rings of two nodes, each in its own key file."""

from __future__ import annotations

from pathlib import Path

import pytest

from medzip_scp.identity.keys import IdentityKeyring


@pytest.fixture
def keyring(tmp_path: Path) -> IdentityKeyring:
    """This node's key ring: one generation, saved to ``tmp_path/keys/identity.json``."""
    return IdentityKeyring.open_or_create(tmp_path / "keys" / "identity.json")


@pytest.fixture
def other_keyring(tmp_path: Path) -> IdentityKeyring:
    """Another node's key ring."""
    return IdentityKeyring.open_or_create(tmp_path / "other" / "identity.json")
