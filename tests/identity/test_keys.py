"""The identity key file: created once, loaded or refused in one line, rotated without
losing a generation, written 0600 and atomically; no key material in reprs or exports."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from medzip_scp.identity.keys import (
    KEY_FILE_FORMAT,
    IdentityKeyError,
    IdentityKeyring,
    KeyGeneration,
    PublicKeys,
    public_key_id,
)


def _secrets(keyring: IdentityKeyring) -> list[str]:
    """Every generation's master and private signing key, as the key file writes them
    (hex) and in lower and upper case."""
    out = []
    for g in keyring.generations:
        private = g.signing.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        out += [g.master.hex(), private.hex()]
    return out + [s.upper() for s in out]


def _ids(keyring: IdentityKeyring) -> list[tuple[bytes, bytes]]:
    return [(g.master_id, g.signing_id) for g in keyring.generations]


def test_open_or_create_makes_one_generation_then_loads_it(keyring: IdentityKeyring) -> None:
    assert len(keyring.generations) == 1
    assert keyring.path.is_file()
    again = IdentityKeyring.open_or_create(keyring.path)
    assert again.node_id == keyring.node_id
    assert _ids(again) == _ids(keyring)
    assert again.master(keyring.current.master_id) == keyring.current.master
    assert again.master(b"\x00" * 4) is None


def test_rotate_keeps_every_generation(keyring: IdentityKeyring) -> None:
    first = keyring.current
    second = keyring.rotate()
    third = keyring.rotate()
    assert keyring.current is third
    assert len({g.master_id for g in (first, second, third)}) == 3
    loaded = IdentityKeyring.load(keyring.path)
    assert _ids(loaded) == [(g.master_id, g.signing_id) for g in (first, second, third)]
    for g in (first, second, third):  # old generations still open their payloads
        assert loaded.master(g.master_id) == g.master
    assert set(loaded.public_keys().keys) == {g.signing_id for g in (first, second, third)}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_0600_in_a_0700_folder(keyring: IdentityKeyring) -> None:
    assert _mode(keyring.path) == 0o600
    assert _mode(keyring.path.parent) == 0o700
    keyring.rotate()
    assert _mode(keyring.path) == 0o600
    assert [p.name for p in keyring.path.parent.iterdir()] == [keyring.path.name]


def test_key_file_stays_0600_over_a_stale_temporary_file(keyring: IdentityKeyring) -> None:
    """A .tmp left behind (a crash before the rename) must not lend the key file its mode."""
    stale = keyring.path.with_name(f"{keyring.path.name}.{os.getpid()}.tmp")
    stale.write_text("left over")
    stale.chmod(0o644)
    keyring.rotate()
    assert _mode(keyring.path) == 0o600
    assert not stale.exists()


def test_concurrent_first_starts_share_one_key_file(tmp_path: Path) -> None:
    """Two processes opening a fresh archive at once (node and worker) end up with the same
    keys: the second never replaces the file the first created."""
    path = tmp_path / "keys" / "identity.json"
    first = IdentityKeyring.open_or_create(path)
    racing = IdentityKeyring(
        "another-node", [KeyGeneration.new()], path
    )  # what a process that found no file a moment ago made
    with pytest.raises(FileExistsError):
        racing.save(exclusive=True)
    assert IdentityKeyring.load(path).current.master_id == first.current.master_id
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_save_is_atomic(keyring: IdentityKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails before its rename leaves the previous key file whole, and the
    key ring as it was."""
    before = keyring.path.read_bytes()
    current = keyring.current

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        keyring.rotate()
    monkeypatch.undo()
    assert keyring.path.read_bytes() == before
    # nor is the unsaved generation used: what it sealed would not open after a restart
    assert keyring.current is current and len(keyring.generations) == 1
    assert len(IdentityKeyring.load(keyring.path).generations) == 1


def _generation_doc(keyring: IdentityKeyring) -> dict[str, str]:
    return json.loads(keyring.path.read_text())["generations"][0]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "is missing; restore it from your key backup"),
        (b"", "is unreadable"),
        (b"{not json", "is unreadable"),
        (b"\xff\xfe\x00binary", "is unreadable"),
        (b"[]", "is malformed"),
        (b"null", "is malformed"),
        (b'{"format": "medzip-identity-keys-0", "node_id": "n", "generations": []}', "format"),
        (b'{"format": "%s", "generations": []}' % KEY_FILE_FORMAT.encode(), "is malformed"),
        (
            b'{"format": "%s", "node_id": "n", "generations": []}' % KEY_FILE_FORMAT.encode(),
            "no key",
        ),
        ("master=short", "a master key must be 32 bytes"),
        ("master=not hex", "is malformed"),
        ("signing=short", "is malformed"),
        ("signing=missing", "is malformed"),
    ],
)
def test_unusable_key_file_is_refused_in_one_line_naming_it(
    keyring: IdentityKeyring, content: bytes | str | None, says: str
) -> None:
    path = keyring.path
    if content is None:
        path.unlink()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        field, change = content.split("=")
        doc = json.loads(path.read_text())
        generation = doc["generations"][0]
        if change == "missing":
            del generation[field]
        else:
            generation[field] = {"short": generation[field][:62], "not hex": "zz" * 32}[change]
        path.write_text(json.dumps(doc))
    secrets = _secrets(keyring)
    with pytest.raises(IdentityKeyError) as err:
        IdentityKeyring.load(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert says in message
    assert not any(s in message or s[:16] in message for s in secrets)
    if content is not None:  # open_or_create makes a file only where there is none
        with pytest.raises(IdentityKeyError):
            IdentityKeyring.open_or_create(path)


def test_reprs_show_ids_never_keys(keyring: IdentityKeyring) -> None:
    keyring.rotate()
    shown = " ".join(
        [repr(keyring), str(keyring), repr(keyring.generations), repr(keyring.public_keys())]
        + [repr(g) for g in keyring.generations]
    )
    assert keyring.current.master_id.hex() in shown
    assert keyring.current.signing_id.hex() in shown
    assert not any(s[:16] in shown for s in _secrets(keyring))


def test_export_public_holds_no_secret_and_loads(keyring: IdentityKeyring, tmp_path: Path) -> None:
    keyring.rotate()
    text = keyring.export_public()
    assert not any(s[:16] in text for s in _secrets(keyring))
    assert "master" not in text and "signing" not in text
    exported = tmp_path / "public.json"
    exported.write_text(text)
    public = PublicKeys.load(exported)
    assert public.node_id == keyring.node_id
    assert set(public.keys) == {g.signing_id for g in keyring.generations}
    for g in keyring.generations:
        assert public.keys[g.signing_id].public_bytes_raw() == g.public_raw


@pytest.mark.parametrize(
    "change",
    ["wrong id", "another key's id", "format", "not hex", "short key", "no keys", "list", "null"],
)
def test_public_key_file_is_checked(
    keyring: IdentityKeyring, other_keyring: IdentityKeyring, tmp_path: Path, change: str
) -> None:
    keyring.rotate()
    doc = json.loads(keyring.export_public())
    first, second = doc["keys"]
    if change == "wrong id":
        first["id"] = public_key_id(b"something else").hex()
    elif change == "another key's id":  # an id must name its own key, not another trusted one
        first["id"], second["id"] = second["id"], first["id"]
    elif change == "format":
        doc["format"] = "medzip-identity-keys-1"
    elif change == "not hex":
        first["public"] = "zz" * 32
    elif change == "short key":
        first["public"] = first["public"][:-2]
    elif change == "no keys":
        del doc["keys"]
    else:
        doc = [] if change == "list" else None
    path = tmp_path / "public.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(IdentityKeyError) as err:
        PublicKeys.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_generation_is_new_each_time() -> None:
    a, b = KeyGeneration.new(), KeyGeneration.new()
    assert a.master != b.master and a.signing_id != b.signing_id
    assert len(a.master) == 32 and len(a.master_id) == 4


def test_two_rotations_from_separate_loads_keep_both_generations(tmp_path: Path) -> None:
    """Two admins (or a script run twice) rotating from key rings loaded before either
    saved: neither generation is lost (a node may already seal with the first)."""
    path = tmp_path / "identity.json"
    IdentityKeyring.open_or_create(path)
    first, second = IdentityKeyring.load(path), IdentityKeyring.load(path)
    a, b = first.rotate(), second.rotate()
    on_disk = {g.master_id for g in IdentityKeyring.load(path).generations}
    assert {a.master_id, b.master_id} <= on_disk and len(on_disk) == 3


def test_rotate_on_an_unwritable_key_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from medzip_scp.cli.main import app

    data = tmp_path / "data"
    runner = CliRunner()
    assert runner.invoke(app, ["keys", "show", "--data-dir", str(data)]).exit_code == 0
    before = (data / "keys" / "identity.json").read_bytes()

    def read_only(*_: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    result = runner.invoke(app, ["keys", "rotate", "--data-dir", str(data)])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "cannot write the identity key file" in result.output
    assert "Read-only file system" in result.output
    assert (data / "keys" / "identity.json").read_bytes() == before
