"""Exception hierarchy of the codec.

Every message states the rule that was broken, the expected value and the actual value,
and never contains pixel or dataset values (no PHI).
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "CorruptStreamError",
    "IncompatibleLibraryError",
    "MissingReferenceError",
    "UnknownModelError",
    "UnsupportedFormatError",
]


class CodecError(Exception):
    """Base class of every error raised by :mod:`medzip_scp.codec`."""


class CorruptStreamError(CodecError):
    """A blob failed validation: bad magic, length, CRC, or an inconsistent record.

    A blob that raises this is never decoded to pixels.
    """


class UnsupportedFormatError(CodecError):
    """A well-formed blob uses a format version or feature this decoder does not implement."""


class IncompatibleLibraryError(UnsupportedFormatError):
    """Decoding needs a library that is missing or outside the versions known to decode it.

    A kind of :class:`UnsupportedFormatError`: the blob is well-formed, this installation cannot
    decode it (e.g. ``local-lm-v1`` streams need ``torch`` and a ``transformers`` release whose
    GPT-2 API the float model was written against; ``global-vae-v1`` streams need
    ``constriction``, whose table quantiser is part of their format).

    Parameters
    ----------
    what
        What needs the library, e.g. ``"local-lm-v1 streams"``.
    library
        The distribution name, e.g. ``"transformers"``.
    required
        Its version specifier, e.g. ``">=5.24,<5.26"``.
    installed
        The installed version, or ``None`` when it is not installed.
    """

    def __init__(self, what: str, library: str, required: str, installed: str | None) -> None:
        self.library = library
        self.required = required
        self.installed = installed
        have = "not installed" if installed is None else f"installed {installed}"
        super().__init__(
            f"{what} need {library}{required} ({have}): pip install '{library}{required}'"
        )


class MissingReferenceError(UnsupportedFormatError):
    """A blob's data set is coded against a reference (the bytes its series shares) that was
    not given or is not in the store.

    A kind of :class:`UnsupportedFormatError`: the blob is well-formed; it decodes only with
    the reference it names (:mod:`medzip_scp.codec.container`, section ``DATASET``), which the
    node keeps in its blob store (``refs/``) for as long as it keeps blobs.

    Parameters
    ----------
    sha256
        The raw 32-byte sha256 of the reference the blob names.
    """

    def __init__(self, sha256: bytes) -> None:
        self.sha256 = sha256
        super().__init__(
            f"section DATASET: needs data set reference {sha256.hex()}, which was not found: "
            "decode it where its blob store's refs/ folder is (medzip retrieves, verifies and "
            "rebuilds find it there)"
        )


class UnknownModelError(CodecError):
    """A model (or adapter) a blob names, or an encoder asks for, cannot be used here.

    Parameters
    ----------
    model_id
        The model identifier (as recorded in a blob).
    model_sha256
        Hex sha256 of the model's manifest, as recorded in the blob or registered.
    adapter_sha256
        Hex sha256 of the adapter weights (all zeros for none).
    reason
        What is wrong, completing "model ... (...) <reason>" (default: not installed).
    """

    def __init__(
        self,
        model_id: str,
        model_sha256: str,
        adapter_sha256: str,
        reason: str = "is not installed",
    ) -> None:
        self.model_id = model_id
        self.model_sha256 = model_sha256
        self.adapter_sha256 = adapter_sha256
        self.reason = reason
        super().__init__(
            f"model {model_id!r} (manifest sha256 {model_sha256}, adapter sha256 "
            f"{adapter_sha256}) {reason}: the models folder (models/, or the one given by "
            "--models or [pipeline] models_dir) must hold the released model with that manifest"
        )
