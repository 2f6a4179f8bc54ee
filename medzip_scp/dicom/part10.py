"""Received DICOM objects: parse, validate and hash what a peer sent, without PHI in errors.

The node keeps the peer's encoded data set bytes exactly as received; these helpers only read
them (PS3.10 file format: 128-byte preamble, ``DICM``, File Meta group 0002, then the data set).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

PREAMBLE_LENGTH = 132  # 128-byte preamble + b"DICM"
_PIXEL_DATA = 0x7FE00010


class RejectReason(Enum):
    """Why a received object is refused; ``net`` maps each to a DIMSE status."""

    UNPARSABLE = "unparsable"
    MISSING_ATTRIBUTE = "missing_attribute"
    SOP_CLASS_MISMATCH = "sop_class_mismatch"
    SOP_INSTANCE_MISMATCH = "sop_instance_mismatch"
    PIXEL_DATA_INCONSISTENT = "pixel_data_inconsistent"


class InvalidObjectError(ValueError):
    """A received object cannot be archived. The message carries no PHI."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ReceivedObject:
    """A parsed, validated object as spooled by the network layer."""

    path: Path
    file_meta: FileMetaDataset
    dataset: Dataset  # large values (pixel data) deferred, not loaded
    dataset_offset: int  # where the data set bytes start in the file
    file_size: int

    @property
    def dataset_size(self) -> int:
        return self.file_size - self.dataset_offset

    @property
    def transfer_syntax_uid(self) -> UID:
        return UID(self.file_meta.TransferSyntaxUID)


# Explicit VR encodings with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset(
    {
        b"OB",
        b"OD",
        b"OF",
        b"OL",
        b"OV",
        b"OW",
        b"SQ",
        b"SV",
        b"UC",
        b"UN",
        b"UR",
        b"UT",
        b"UV",
    }
)


def dataset_offset(path: Path) -> int:
    """Return the byte offset of the data set in a Part-10 file (after group 0002)."""
    with open(path, "rb") as fh:
        return dataset_offset_of(fh)


def dataset_offset_of(fh: BinaryIO) -> int:
    """Return the byte offset of the data set in a Part-10 stream (after group 0002).

    Group 0002 is always Explicit VR Little Endian (PS3.10 7.1), whatever the data set uses.
    """
    fh.seek(0)
    head = fh.read(PREAMBLE_LENGTH)
    if len(head) != PREAMBLE_LENGTH or head[128:] != b"DICM":
        raise InvalidObjectError(RejectReason.UNPARSABLE, "no DICOM preamble and prefix")
    position = PREAMBLE_LENGTH
    while True:
        header = fh.read(8)
        if len(header) < 8 or struct.unpack("<H", header[:2])[0] != 0x0002:
            return position
        if header[4:6] in LONG_LENGTH_VRS:
            extra = fh.read(4)
            if len(extra) < 4:
                raise InvalidObjectError(RejectReason.UNPARSABLE, "truncated file meta")
            position += 12 + struct.unpack("<I", extra)[0]
        else:
            position += 8 + struct.unpack("<H", header[6:8])[0]
        fh.seek(position)


def _check_complete(ds: Dataset, file_size: int) -> None:
    """Reject a data set that is cut short or followed by bytes that are not elements.

    pydicom silently shortens a truncated final value and stops at a partial element header,
    so compare the elements' extent with the file size before any value is converted.
    """
    end = 0
    measurable = True
    for raw in ds._dict.values():
        tell = getattr(raw, "value_tell", None)
        length = getattr(raw, "length", None)
        if tell is None or length is None:
            continue
        if length == 0xFFFFFFFF:
            if raw.value is None:  # deferred: its end is not known without reading it
                measurable = False
                continue
            length = len(raw.value) + 8  # the value, then the Sequence Delimitation Item
        end = max(end, tell + length)
    if end > file_size or (measurable and end != file_size):
        raise InvalidObjectError(
            RejectReason.UNPARSABLE,
            f"data set elements span {end} bytes but {file_size} arrived",
        )


def expected_pixel_bytes(ds: Dataset) -> int:
    """Bytes of native Pixel Data the image attributes call for (PS3.5 8.1.1), unpadded."""
    rows = int(ds.Rows)
    columns = int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    return (rows * columns * samples * frames * bits + 7) // 8


def read_received(
    path: Path,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
) -> ReceivedObject:
    """Parse and validate a spooled Part-10 object.

    Raises
    ------
    InvalidObjectError
        The object cannot be parsed, lacks an identifying attribute, disagrees with the
        C-STORE request, or its pixel data is shorter than its image attributes require.
    """
    offset = dataset_offset(path)
    try:
        ds = dcmread(path, defer_size=1 << 16)
        _check_complete(ds, path.stat().st_size)
    except InvalidObjectError:
        raise
    except Exception as exc:
        raise InvalidObjectError(
            RejectReason.UNPARSABLE, f"data set could not be parsed ({type(exc).__name__})"
        ) from None
    meta = ds.file_meta
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise InvalidObjectError(
                RejectReason.MISSING_ATTRIBUTE, f"required attribute {keyword} is missing or empty"
            )
    if expected_sop_class_uid and ds.SOPClassUID != expected_sop_class_uid:
        raise InvalidObjectError(
            RejectReason.SOP_CLASS_MISMATCH,
            f"SOPClassUID {ds.SOPClassUID} differs from the request's {expected_sop_class_uid}",
        )
    if expected_sop_instance_uid and ds.SOPInstanceUID != expected_sop_instance_uid:
        raise InvalidObjectError(
            RejectReason.SOP_INSTANCE_MISMATCH,
            f"SOPInstanceUID {ds.SOPInstanceUID} differs from the request's "
            f"{expected_sop_instance_uid}",
        )
    _check_pixel_data(ds, UID(meta.TransferSyntaxUID))
    return ReceivedObject(
        path=path,
        file_meta=meta,
        dataset=ds,
        dataset_offset=offset,
        file_size=path.stat().st_size,
    )


def _check_pixel_data(ds: Dataset, transfer_syntax: UID) -> None:
    if _PIXEL_DATA not in ds._dict:
        return
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(keyword) in (None, ""):
            raise InvalidObjectError(
                RejectReason.PIXEL_DATA_INCONSISTENT,
                f"Pixel Data present but {keyword} is missing",
            )
    if transfer_syntax.is_encapsulated:
        return  # the fragments were parsed above; their content is checked at transcode time
    raw = ds.get_item(_PIXEL_DATA)
    length = raw.length if hasattr(raw, "length") else len(ds.PixelData)
    try:
        expected = expected_pixel_bytes(ds)
    except (TypeError, ValueError):
        raise InvalidObjectError(
            RejectReason.PIXEL_DATA_INCONSISTENT, "image attributes are not integers"
        ) from None
    if length < expected:
        raise InvalidObjectError(
            RejectReason.PIXEL_DATA_INCONSISTENT,
            f"Pixel Data holds {length} bytes, Rows x Columns x Samples x Frames x "
            f"BitsAllocated needs {expected}",
        )


def load_dataset(part10: bytes) -> Dataset:
    """Parse a stored Part-10 object completely (for retrieval)."""
    return dcmread(BytesIO(part10))
