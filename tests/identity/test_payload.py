"""The sealed identity payload: opens with any kept generation, refuses another node's key
and every altered bit; its signature checks with exported public keys alone."""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from pathlib import Path

import pytest

from medzip_scp.identity.keys import IdentityKeyring, PublicKeys
from medzip_scp.identity.payload import (
    _HEADER,
    OVERHEAD,
    IdentityRecord,
    PayloadKeyMissingError,
    PayloadTamperedError,
    _instance_key,
    check_signature,
    open_payload,
    seal_payload,
)

NAME = b"Zqxwv^Distinctive"
MASTER_ID = slice(1, 5)
SIGNING_ID = slice(5, 9)
SIGNATURE = 64


def _record(removed: tuple[tuple[int, bytes], ...] | None = None) -> IdentityRecord:
    if removed is None:
        removed = ((132 + 200, b"\x10\x00\x10\x00PN\x12\x00" + NAME + b" "), (400, b"\x00" * 9))
    return IdentityRecord(
        node_id="6f1c2a90-node",
        archived_at_us=1_764_921_600_123_456,
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3",
        pixel_sha256=hashlib.sha256(b"pixels").digest(),
        rest_sha256=hashlib.sha256(b"rest").digest(),
        removed=removed,
    )


@pytest.mark.parametrize(
    "record",
    [
        _record(),
        _record(()),  # nothing cut out
        _record(tuple((i * 1000 + 3 * i * i, bytes([i % 256]) * (i % 7)) for i in range(2000))),
        _record(((0, b""), (0, b"\x00"), (2**40, b"x" * 70_000))),  # same offset; far; long
        IdentityRecord(
            "nœud-Zürich-東京", 0, "1.2", "1.2.3", "1.2.3.4", bytes(32), b"\xff" * 32, ()
        ),
    ],
    ids=["typical", "none removed", "many removed", "odd removed", "non-ASCII, zeros"],
)
def test_record_encodes_and_decodes(record: IdentityRecord) -> None:
    assert IdentityRecord.decode(record.encode()) == record


def _stored(record: IdentityRecord, version: int) -> bytes:
    """``record`` encoded with ``version`` as its version byte, stored (not deflated)."""
    packed = record.encode()
    raw = zlib.decompress(packed[5:], -15) if packed[0] == 1 else packed[1:]
    assert raw[0] == 2  # the version encode writes
    return bytes([0, version]) + raw[1:]


def test_a_version_1_record_gives_its_time_in_whole_seconds() -> None:
    record = _record(())
    assert IdentityRecord.decode(_stored(record, 2)) == record
    in_seconds = dataclasses.replace(record, archived_at_us=1_764_921_600)
    assert IdentityRecord.decode(_stored(in_seconds, 1)) == dataclasses.replace(
        record, archived_at_us=1_764_921_600_000_000
    )
    with pytest.raises(ValueError, match="unknown version"):
        IdentityRecord.decode(_stored(record, 3))


def test_record_is_deflated_only_when_that_is_smaller() -> None:
    repetitive = _record(tuple((i * 100, NAME) for i in range(50)))
    noise = b"".join(hashlib.sha512(bytes([i])).digest() for i in range(3))
    random = IdentityRecord("n", 1, "1", "2", "3", noise[:32], noise[32:64], ((0, noise[64:]),))
    assert repetitive.encode()[0] == 1
    assert random.encode()[0] == 0  # stored: hashes do not deflate


def test_seal_and_open(keyring: IdentityKeyring) -> None:
    record = _record()
    sealed = seal_payload(record, keyring)
    assert len(sealed) == len(record.encode()) + OVERHEAD
    assert open_payload(sealed, keyring) == record
    assert NAME not in sealed and b"Zqxwv" not in sealed
    assert sealed[MASTER_ID] == keyring.current.master_id
    assert sealed[SIGNING_ID] == keyring.current.signing_id
    assert seal_payload(record, keyring) != sealed  # a fresh salt (and instance key) each time


def test_payloads_of_older_generations_still_open(keyring: IdentityKeyring) -> None:
    old = seal_payload(_record(), keyring)
    keyring.rotate()
    new = seal_payload(_record(), keyring)
    assert new[MASTER_ID] != old[MASTER_ID] and new[SIGNING_ID] != old[SIGNING_ID]
    reloaded = IdentityKeyring.load(keyring.path)
    assert open_payload(old, reloaded) == open_payload(new, reloaded) == _record()


def test_unknown_master_key_is_key_missing(
    keyring: IdentityKeyring, other_keyring: IdentityKeyring
) -> None:
    sealed = seal_payload(_record(), other_keyring)
    with pytest.raises(PayloadKeyMissingError) as err:
        open_payload(sealed, keyring)
    assert err.value.key_id == other_keyring.current.master_id
    assert other_keyring.current.master.hex() not in str(err.value)


def test_resigned_by_another_node_is_tampered_untrusted(
    keyring: IdentityKeyring, other_keyring: IdentityKeyring
) -> None:
    """Our master key id and ciphertext, signed again by another node's key."""
    sealed = seal_payload(_record(), keyring)
    other = other_keyring.current
    signed = sealed[:5] + other.signing_id + sealed[9:-SIGNATURE]
    forged = signed + other.signing.sign(signed)
    with pytest.raises(PayloadTamperedError, match="does not trust"):
        open_payload(forged, keyring)
    with pytest.raises(PayloadTamperedError, match="does not trust"):
        check_signature(forged, keyring.public_keys())
    # the same, still naming our signing key: the signature does not verify
    signed = sealed[:-SIGNATURE]
    with pytest.raises(PayloadTamperedError, match="does not verify"):
        open_payload(signed + other.signing.sign(signed), keyring)


def test_every_flipped_bit_is_caught(keyring: IdentityKeyring) -> None:
    sealed = seal_payload(_record(), keyring)
    for pos in range(len(sealed)):
        for bit in range(8):
            bad = bytearray(sealed)
            bad[pos] ^= 1 << bit
            # the master key id too: the signature, by our key, covers it
            with pytest.raises(PayloadTamperedError):
                open_payload(bytes(bad), keyring)


def test_cut_or_extended_payload_is_tampered(keyring: IdentityKeyring) -> None:
    sealed = seal_payload(_record(), keyring)
    for bad in [sealed[:n] for n in range(len(sealed))] + [sealed + b"\x00", b"\x00" + sealed]:
        with pytest.raises(PayloadTamperedError):
            open_payload(bad, keyring)


def test_a_record_that_does_not_parse_is_tampered(keyring: IdentityKeyring) -> None:
    """Sealed with our keys but not a record (a bug or a stolen key): refused, not raised
    as something else."""
    generation = keyring.current
    deflated = _record().encode()
    assert deflated[0] == 1
    for plaintext in (b"", b"\x07", b"\x01\x00", b"\x00\x02", deflated[:-1], deflated + b"\x00"):
        header = _HEADER.pack(1, generation.master_id, generation.signing_id, bytes(16))
        ciphertext = _instance_key(generation.master, bytes(16)).encrypt(
            bytes(12), plaintext, header
        )
        signed = header + ciphertext
        with pytest.raises(PayloadTamperedError, match="malformed"):
            open_payload(signed + generation.signing.sign(signed), keyring)


def test_signature_checks_with_exported_public_keys_alone(
    keyring: IdentityKeyring, other_keyring: IdentityKeyring, tmp_path: Path
) -> None:
    old = seal_payload(_record(), keyring)
    keyring.rotate()
    new = seal_payload(_record(), keyring)
    exported = tmp_path / "public.json"
    exported.write_text(keyring.export_public())
    public = PublicKeys.load(exported)
    assert check_signature(old, public) == keyring.generations[0].signing_id
    assert check_signature(new, public) == keyring.current.signing_id
    bad = bytearray(new)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(PayloadTamperedError, match="does not verify"):
        check_signature(bytes(bad), public)
    with pytest.raises(PayloadTamperedError, match="does not trust"):
        check_signature(seal_payload(_record(), other_keyring), public)
