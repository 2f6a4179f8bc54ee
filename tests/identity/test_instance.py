"""Instances that carry their own identity: every file seals and opens back byte for byte,
and each failed check has its verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from medzip_scp.dicom.blob import encode_dataset
from medzip_scp.dicom.identifying import identifying_tags
from medzip_scp.identity.instance import (
    IdentityCheckError,
    IdentityPolicy,
    Verdict,
    open_instance,
    seal_instance,
    stored_object,
)
from medzip_scp.identity.keys import IdentityKeyring

FILES = [
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "rtplan.dcm",
    "image_dfl.dcm",
    "SC_rgb_rle_2frame.dcm",
    "UN_sequence.dcm",
]


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> IdentityKeyring:
    return IdentityKeyring.open_or_create(tmp_path_factory.mktemp("keys") / "identity.json")


@pytest.mark.parametrize("name", FILES)
def test_seals_and_opens_back_byte_for_byte(name: str, keyring: IdentityKeyring) -> None:
    original = Path(get_testdata_file(name)).read_bytes()
    blob = seal_instance(original, keyring, IdentityPolicy(identifying_tags()))
    opened = open_instance(blob, keyring, None)
    assert opened.part10 == original
    assert opened.record.node_id == keyring.node_id
    stored, sealed = stored_object(blob)
    assert sealed and len(stored) <= len(original)


def test_verdicts(keyring: IdentityKeyring, tmp_path: Path) -> None:
    original = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    blob = seal_instance(original, keyring, IdentityPolicy(identifying_tags()))
    uid = open_instance(blob, keyring, None).record.sop_instance_uid
    assert open_instance(blob, keyring, uid).part10 == original

    def verdict(blob: bytes, keys: IdentityKeyring | None, uid: str | None) -> tuple[str, str]:
        with pytest.raises(IdentityCheckError) as err:
            open_instance(blob, keys, uid)
        return err.value.verdict, err.value.reason

    assert verdict(blob, keyring, "1.2.3")[0] == Verdict.TAMPERED
    assert verdict(blob, None, uid)[0] == Verdict.KEY_MISSING
    other = IdentityKeyring.open_or_create(tmp_path / "other.json")
    assert verdict(blob, other, uid)[0] == Verdict.KEY_MISSING
    assert verdict(encode_dataset(original), keyring, uid) == (
        Verdict.TAMPERED,
        "blob carries no identity payload",
    )
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 1
    assert verdict(bytes(damaged), keyring, uid)[0] == Verdict.TAMPERED
