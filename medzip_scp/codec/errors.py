"""Exception hierarchy of the codec.

Every message states the rule that was broken, the expected value and the actual value,
and never contains pixel or dataset values (no PHI).
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "CorruptStreamError",
    "IncompatibleLibraryError",
    "UnknownModelError",
    "UnsupportedFormatError",
]


class CodecError(Exception):
    """Base class of every error raised by :mod:`medzip_scp.codec`."""


class CorruptStreamError(CodecError):
    """A blob failed validation: bad magic, length, CRC, or an inconsistent record.

    A blob that raises this is never decoded to pixels.
    """


class IncompatibleLibraryError(CodecError):
    """Decoding a blob needs a library (or library version) that is not installed.

    The message names the library, the stream or model that needs it, and what to install.
    """


class UnsupportedFormatError(CodecError):
    """A well-formed blob uses a format version or feature this decoder does not implement."""


class UnknownModelError(CodecError):
    """A blob names a model (or adapter) whose weights are not installed.

    Parameters
    ----------
    model_id
        The model identifier recorded in the blob.
    model_sha256
        Hex sha256 of the model weights recorded in the blob.
    adapter_sha256
        Hex sha256 of the adapter weights recorded in the blob (all zeros for none).
    """

    def __init__(self, model_id: str, model_sha256: str, adapter_sha256: str) -> None:
        self.model_id = model_id
        self.model_sha256 = model_sha256
        self.adapter_sha256 = adapter_sha256
        super().__init__(
            f"blob was coded with model {model_id!r} (weights sha256 {model_sha256}, "
            f"adapter sha256 {adapter_sha256}), which is not installed; install the model "
            f"whose manifest lists sha256 {model_sha256} under models/ to decode it"
        )
