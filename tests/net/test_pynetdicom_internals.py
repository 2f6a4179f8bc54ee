"""The start-up check of the pynetdicom internals the node relies on (net.pynetdicom_internals)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pynetdicom import dimse_messages, sop_class, transport
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext

from medzip_scp.net import pynetdicom_internals
from medzip_scp.net.pynetdicom_internals import PynetdicomMismatchError, check_internals
from medzip_scp.net.server import configure_pynetdicom

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def test_the_installed_pynetdicom_passes() -> None:
    check_internals()
    assert pynetdicom.__version__.startswith(pynetdicom_internals.TESTED_VERSION + ".")


def test_pyproject_pins_the_tested_minor_version() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    major, minor = pynetdicom_internals.TESTED_VERSION.split(".")
    assert f"pynetdicom>={major}.{minor},<{major}.{int(minor) + 1}" in dependencies


def _not_sleeping(self: Any) -> None:
    """A reactor loop that no longer calls ``time.sleep``."""


@pytest.mark.parametrize(
    ("owner", "name", "named"),
    [
        (sop_class, "_STORAGE_CLASSES", "sop_class._STORAGE_CLASSES"),
        (transport, "deepcopy", "transport.deepcopy"),
        (dimse_messages, "NamedTemporaryFile", "NamedTemporaryFile"),
        (DULServiceProvider, "_read_pdu_data", "_read_pdu_data"),
        (transport.RequestHandler, "_create_association", "_create_association"),
        (PresentationContext, "as_scu", "_as_scu"),
    ],
)
def test_a_missing_internal_fails_in_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, named: str
) -> None:
    monkeypatch.delattr(owner, name)
    with pytest.raises(PynetdicomMismatchError) as raised:
        check_internals()
    message = str(raised.value)
    assert "\n" not in message
    assert f"pynetdicom {pynetdicom.__version__} is not as medzip expects" in message
    assert named in message
    assert f"install pynetdicom {pynetdicom_internals.TESTED_VERSION}.x" in message


def test_a_reactor_loop_without_time_sleep_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Association, "_run_reactor", _not_sleeping)
    with pytest.raises(PynetdicomMismatchError, match="the reactor loops call time.sleep"):
        check_internals()


def test_the_node_checks_before_it_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(DULServiceProvider, "_is_transport_event")
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", "unpatched")
    with pytest.raises(PynetdicomMismatchError, match="_read_pdu_data"):
        configure_pynetdicom()
    assert dimse_messages.NamedTemporaryFile == "unpatched"
