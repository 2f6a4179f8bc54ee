"""The node's identity keys: what seals and signs the patient's identity inside each blob.

One key *generation* is an identity master key (32 random bytes, from which each instance's
AES-256-GCM key is derived by HKDF) and an Ed25519 signing key, created together. The key file
holds every generation the node ever had, newest last: new payloads use the newest, old ones
open with the generation their blob names, forever. ``medzip keys rotate`` appends one.

Ids are the first 4 bytes of a SHA-256 (of the master key under a label, of the raw public
key): they name keys in blobs without revealing them. Nothing here ever logs or prints key
material; the reprs show ids only.

File format (JSON, mode 0600, written atomically)::

    {"format": "medzip-identity-keys-1", "node_id": "...",
     "generations": [{"created": "...", "master": "<64 hex>", "signing": "<64 hex>"}, ...]}

``medzip keys export-public`` writes the public half (JSON, ``"format":
"medzip-identity-public-1"``): node id and every signing key's id and raw public key; anyone
holding it can check the signature of a blob's payload, nobody can open it.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "KEY_FILE_FORMAT",
    "PUBLIC_FORMAT",
    "IdentityKeyError",
    "IdentityKeyring",
    "KeyGeneration",
    "PublicKeys",
]

KEY_FILE_FORMAT = "medzip-identity-keys-1"
PUBLIC_FORMAT = "medzip-identity-public-1"
ID_BYTES = 4


class IdentityKeyError(ValueError):
    """The identity key file is missing, unreadable or malformed (one line, names the file)."""


def master_key_id(material: bytes) -> bytes:
    return hashlib.sha256(b"medzip-identity-master" + material).digest()[:ID_BYTES]


def public_key_id(public_raw: bytes) -> bytes:
    return hashlib.sha256(b"medzip-identity-signing" + public_raw).digest()[:ID_BYTES]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, repr=False)
class KeyGeneration:
    """One master key and the signing key made with it."""

    created: str
    master: bytes
    signing: Ed25519PrivateKey

    @property
    def master_id(self) -> bytes:
        return master_key_id(self.master)

    @property
    def public_raw(self) -> bytes:
        return _raw_public(self.signing.public_key())

    @property
    def signing_id(self) -> bytes:
        return public_key_id(self.public_raw)

    def __repr__(self) -> str:
        return f"KeyGeneration(master={self.master_id.hex()}, signing={self.signing_id.hex()})"

    @classmethod
    def new(cls) -> KeyGeneration:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(now, secrets.token_bytes(32), Ed25519PrivateKey.generate())


@dataclass(frozen=True)
class PublicKeys:
    """Signing keys trusted for verification, by id (a node's own, or an exported set)."""

    node_id: str
    keys: dict[bytes, Ed25519PublicKey]

    @classmethod
    def load(cls, path: Path) -> PublicKeys:
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != PUBLIC_FORMAT:
                raise ValueError(f"format must be {PUBLIC_FORMAT!r}")
            keys = {
                bytes.fromhex(k["id"]): Ed25519PublicKey.from_public_bytes(
                    bytes.fromhex(k["public"])
                )
                for k in doc["keys"]
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IdentityKeyError(f"public key file {path}: {exc}") from None
        for key_id, key in keys.items():
            if public_key_id(_raw_public(key)) != key_id:
                raise IdentityKeyError(f"public key file {path}: key id {key_id.hex()} is wrong")
        return cls(str(doc.get("node_id", "")), keys)


class IdentityKeyring:
    """Every key generation of this node, newest last. Its repr shows ids only."""

    def __init__(self, node_id: str, generations: list[KeyGeneration], path: Path) -> None:
        if not generations:
            raise IdentityKeyError(f"identity key file {path} holds no key")
        self.node_id = node_id
        self.generations = generations
        self.path = path
        self._by_master = {g.master_id: g for g in generations}

    def __repr__(self) -> str:
        return f"IdentityKeyring(node={self.node_id}, current={self.current!r})"

    @property
    def current(self) -> KeyGeneration:
        return self.generations[-1]

    def master(self, master_id: bytes) -> bytes | None:
        generation = self._by_master.get(master_id)
        return None if generation is None else generation.master

    def public_keys(self) -> PublicKeys:
        return PublicKeys(
            self.node_id, {g.signing_id: g.signing.public_key() for g in self.generations}
        )

    # -- the key file --------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> IdentityKeyring:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise IdentityKeyError(
                f"identity key file {path} is missing; restore it from your key backup, or set "
                "[identity] key_file to where it is"
            ) from None
        except (OSError, ValueError) as exc:
            raise IdentityKeyError(f"identity key file {path} is unreadable ({exc})") from None
        try:
            if doc["format"] != KEY_FILE_FORMAT:
                raise ValueError(f"format must be {KEY_FILE_FORMAT!r}")
            generations = []
            for g in doc["generations"]:
                master = bytes.fromhex(g["master"])
                if len(master) != 32:
                    raise ValueError("a master key must be 32 bytes")
                signing = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(g["signing"]))
                generations.append(KeyGeneration(str(g["created"]), master, signing))
            node_id = str(doc["node_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IdentityKeyError(f"identity key file {path} is malformed ({exc})") from None
        return cls(node_id, generations, path)

    @classmethod
    def open_or_create(cls, path: Path) -> IdentityKeyring:
        """The key file at ``path``; a new one (one generation) when there is none."""
        if path.exists():
            return cls.load(path)
        keyring = cls(str(uuid.uuid4()), [KeyGeneration.new()], path)
        try:
            keyring.save(exclusive=True)
        except FileExistsError:
            # another process (a node process, a worker) made it meanwhile: use that one,
            # or payloads sealed here would name a key no file holds
            return cls.load(path)
        return keyring

    def rotate(self) -> KeyGeneration:
        """Add a generation (new payloads use it; old ones still open) and save. Under a
        lock on the key folder, after reading the file again: two rotations at once each
        add theirs."""
        before = (self.node_id, self.generations, self._by_master)
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            current = type(self).load(self.path)
            generation = KeyGeneration.new()
            self.node_id, self.generations = current.node_id, [*current.generations, generation]
            self._by_master = {g.master_id: g for g in self.generations}
            self.save()
        except BaseException:  # unsaved, it must not seal: nothing would open it later
            self.node_id, self.generations, self._by_master = before
            raise
        finally:
            os.close(folder)
        return generation

    def save(self, exclusive: bool = False) -> None:
        """Write the key file atomically (0600, fsynced, then renamed into place); with
        ``exclusive``, only if there is none yet (else FileExistsError)."""
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        doc = {
            "format": KEY_FILE_FORMAT,
            "node_id": self.node_id,
            "generations": [
                {
                    "created": g.created,
                    "master": g.master.hex(),
                    "signing": g.signing.private_bytes(
                        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
                    ).hex(),
                }
                for g in self.generations
            ],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        # a new file, never one left behind: O_CREAT keeps an existing file's mode (and
        # follows a link), which the rename would then give the key file
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                os.link(tmp, self.path)  # fails if the file exists: no replacing it
            else:
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def export_public(self) -> str:
        """The public verification keys as JSON text (no secret in it)."""
        return json.dumps(
            {
                "format": PUBLIC_FORMAT,
                "node_id": self.node_id,
                "keys": [
                    {"id": g.signing_id.hex(), "public": g.public_raw.hex(), "created": g.created}
                    for g in self.generations
                ],
            },
            indent=1,
        )
