"""Choosing and producing the transfer syntax an object is returned in (C-GET, C-MOVE).

Rules, in order:
1. the original transfer syntax when the peer accepted it (the bytes go back as received);
2. an uncompressed little-endian syntax the peer accepted (decompressing if needed);
3. a lossless compressed syntax the peer accepted that we can encode (JPEG-LS lossless,
   JPEG 2000 lossless, RLE lossless).
Lossy originals are never re-encoded with a lossy syntax a second time: they go back as they
are or decompressed.
"""

from __future__ import annotations

from collections.abc import Collection

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from medzip_scp.dicom.frames import FrameHeaderError, ImageAttributes, check_frames

UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
NATIVE = (*UNCOMPRESSED_LE, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
# Lossless syntaxes we can encode into, best first.
LOSSLESS_TARGETS = (JPEGLSLossless, JPEG2000Lossless, RLELossless)


class TranscodeError(ValueError):
    """The object cannot be sent in any syntax the peer accepted."""


def proposal_syntaxes(original: UID) -> list[list[UID]]:
    """Transfer syntax lists to propose for one SOP class when we open the association."""
    original = UID(original)
    if original in UNCOMPRESSED_LE:
        return [[ExplicitVRLittleEndian, ImplicitVRLittleEndian]]
    return [[original], [ExplicitVRLittleEndian, ImplicitVRLittleEndian]]


def choose_syntax(original: UID, accepted: Collection[UID]) -> UID:
    """Pick the transfer syntax to send an object in, given the syntaxes the peer accepted."""
    original = UID(original)
    accepted = [UID(a) for a in accepted]
    if original in accepted:
        return original
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if syntax in accepted:
            return syntax
    for syntax in LOSSLESS_TARGETS:
        if syntax in accepted:
            return syntax
    names = ", ".join(a.name for a in accepted) or "none"
    raise TranscodeError(
        f"no accepted transfer syntax can carry an object in {original.name} (accepted: {names})"
    )


def convert(ds: Dataset, target: UID) -> Dataset:
    """Return ``ds`` ready to be sent in ``target`` (modified in place)."""
    original = UID(ds.file_meta.TransferSyntaxUID)
    target = UID(target)
    if original == target:
        return ds
    if not original.is_encapsulated and original != ExplicitVRBigEndian and target in NATIVE:
        # Between uncompressed little-endian syntaxes pynetdicom re-encodes as it sends.
        return ds
    if original.is_encapsulated or original == ExplicitVRBigEndian:
        _check_decoded_size(ds, original)
        try:
            # Same object in another syntax: it keeps its SOP Instance UID (pydicom makes a new
            # one by default).
            ds.decompress(generate_instance_uid=False)  # now Explicit VR Little Endian
        except Exception as exc:
            raise TranscodeError(
                f"could not decompress {original.name} pixel data ({type(exc).__name__})"
            ) from None
    if target in NATIVE:
        return ds
    if target in LOSSLESS_TARGETS:
        try:
            ds.compress(target, generate_instance_uid=False)
        except Exception as exc:
            raise TranscodeError(
                f"could not encode pixel data as {target.name} ({type(exc).__name__})"
            ) from None
        return ds
    raise TranscodeError(f"cannot convert {original.name} to {target.name}")


def _check_decoded_size(ds: Dataset, original: UID) -> None:
    """Refuse to decode frames whose headers claim more than the image attributes: a
    decoder sizes its output from the header (a stored J2K frame claiming 640 x 8,389,088
    pixels took a node to 17 GB), pydicom checks the attributes only afterwards."""
    if not original.is_encapsulated or "PixelData" not in ds:
        return
    try:
        check_frames(
            ds.PixelData, 0, original, ImageAttributes.of(ds), delimited=False, strict=True
        )
    except FrameHeaderError as exc:
        raise TranscodeError(f"{original.name} pixel data not decoded: {exc}") from None
