"""Compare a DICOM object as sent with the object a peer got back, element by element.

``differences(sent, received)`` returns a list of human-readable differences (empty: equal):

* every data element outside group 0002 must be present in both with the same value bytes
  (sequences item by item, recursively); group length elements (gggg,0000) are ignored
  (retired, dropped or recomputed by any sender);
* when the transfer syntax is unchanged, Pixel Data must be byte-identical (encapsulated
  fragments included);
* when it changed, the decoded pixel arrays must be equal, only the attributes that
  depend on the transfer syntax (Photometric Interpretation YBR_* -> RGB, Planar
  Configuration, the Pixel Data VR) may change, and a lossy original must never come back
  in another lossy syntax.

Tolerated, because DCMTK's ``storescu`` applies them before the node ever sees the object
or because the standard calls them insignificant: a value of odd length padded by one byte,
space characters removed from a UI value, leading/trailing spaces of AE, AS, CS, DA, DS,
DT, IS, LO, PN, SH, TM values and trailing spaces of LT, ST, UT, UC values (PS3.5 6.2),
and Data Set Trailing Padding (FFFC,FFFC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    JPEG2000MC,
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from medzip_scp.dicom.part10 import LONG_LENGTH_VRS

PIXEL_DATA = Tag(0x7FE0, 0x0010)
TRAILING_PADDING = Tag(0xFFFC, 0xFFFC)  # PS3.10 7.2: may be dropped by any writer
_PADDED_TEXT = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM"})
_TRAILING_TEXT = frozenset({"LT", "ST", "UT", "UC"})
LOSSY_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, JPEG2000MC}
)
# Attributes a change of transfer syntax may legitimately alter (PS3.5 8.2, PS3.3 C.7.6.3).
SYNTAX_DEPENDENT = frozenset(
    {
        Tag(0x0028, 0x0004),  # Photometric Interpretation (YBR_FULL_422 -> RGB on decoding)
        Tag(0x0028, 0x0006),  # Planar Configuration
        PIXEL_DATA,
    }
)


def is_lossy(transfer_syntax: str) -> bool:
    return UID(transfer_syntax) in LOSSY_SYNTAXES


def _value_bytes(elem: Any, little_endian: bool, implicit: bool) -> bytes:
    """The encoded value of a non-sequence element."""
    if isinstance(elem, RawDataElement):
        return b"" if elem.value is None else bytes(elem.value)
    fp = DicomBytesIO()
    fp.is_little_endian = little_endian
    fp.is_implicit_VR = implicit
    write_data_element(fp, elem)
    data = fp.getvalue()
    # strip the element header: tag (4) + (VR 2 + length 2 | VR 2 + 2 reserved + length 4 |
    # implicit length 4)
    if implicit:
        return data[8:]
    vr = data[4:6]
    return data[12:] if vr in LONG_LENGTH_VRS else data[8:]


def _same_bytes(sent: bytes, received: bytes, vr: str | None) -> bool:
    if sent == received:
        return True
    if vr == "UI":
        return _strip_ui(sent) == _strip_ui(received)
    if vr in _PADDED_TEXT:
        # PS3.5 6.2: leading/trailing spaces of these values are not significant (DCMTK
        # empties all-space values; re-encoding a DS drops a leading space)
        return _split_text(sent) == _split_text(received)
    if vr in _TRAILING_TEXT:  # PS3.5 6.2: trailing spaces are not significant
        return sent.rstrip(b" \x00") == received.rstrip(b" \x00")
    # an odd-length value padded by the sender (PS3.5 7.1.1: values have even length)
    return len(sent) % 2 == 1 and len(received) == len(sent) + 1 and received.startswith(sent)


def _strip_ui(value: bytes) -> bytes:
    return value.replace(b" ", b"").rstrip(b"\x00")


def _split_text(value: bytes) -> list[bytes]:
    return [v.strip(b" \x00") for v in value.split(b"\\")]


def _endianness(ds: Dataset) -> tuple[bool, bool]:
    ts = UID(ds.file_meta.TransferSyntaxUID)
    return ts.is_little_endian, ts.is_implicit_VR


def _vr_of(raw: Any) -> str | None:
    return getattr(raw, "VR", None)


def _compare_datasets(
    sent: Dataset,
    received: Dataset,
    sent_enc: tuple[bool, bool],
    recv_enc: tuple[bool, bool],
    path: str,
    skip: frozenset[Any],
    out: list[str],
) -> None:
    sent_tags = {
        t for t in sent._dict if t.group != 0x0002 and t.element != 0 and t != TRAILING_PADDING
    }
    recv_tags = {
        t for t in received._dict if t.group != 0x0002 and t.element != 0 and t != TRAILING_PADDING
    }
    for tag in sorted(sent_tags - recv_tags - skip):
        out.append(f"{path}{Tag(tag)} missing in the received object")
    for tag in sorted(recv_tags - sent_tags - skip):
        out.append(f"{path}{Tag(tag)} added in the received object")
    same_encoding = sent_enc[0] == recv_enc[0]
    for tag in sorted(sent_tags & recv_tags):
        if tag in skip:
            continue
        a_raw = sent._dict[tag]
        b_raw = received._dict[tag]
        a_elem: DataElement = sent[tag]  # converts raw -> DataElement
        b_elem: DataElement = received[tag]
        label = f"{path}{Tag(tag)} {a_elem.keyword or 'private'}"
        if a_elem.VR == "SQ" or b_elem.VR == "SQ":
            if a_elem.VR != b_elem.VR:
                out.append(f"{label}: VR {a_elem.VR} became {b_elem.VR}")
                continue
            if len(a_elem.value) != len(b_elem.value):
                out.append(f"{label}: {len(a_elem.value)} items sent, {len(b_elem.value)} received")
                continue
            for i, (a_item, b_item) in enumerate(zip(a_elem.value, b_elem.value, strict=True)):
                _compare_datasets(
                    a_item, b_item, sent_enc, recv_enc, f"{label}[{i}].", frozenset(), out
                )
            continue
        if same_encoding:
            a_bytes = _value_bytes(a_raw, *sent_enc)
            b_bytes = _value_bytes(b_raw, *recv_enc)
            if not _same_bytes(a_bytes, b_bytes, _vr_of(a_raw) or a_elem.VR):
                out.append(f"{label}: value bytes differ ({a_bytes[:40]!r} vs {b_bytes[:40]!r})")
        elif a_elem.value != b_elem.value:
            out.append(f"{label}: value differs ({a_elem.value!r:.60} vs {b_elem.value!r:.60})")


def _pixels(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array)


def differences(sent_path: Path | str, received_path: Path | str) -> list[str]:
    """Everything that differs between a sent object and the object received back."""
    sent = pydicom.dcmread(sent_path)
    received = pydicom.dcmread(received_path)
    sent_ts = UID(sent.file_meta.TransferSyntaxUID)
    recv_ts = UID(received.file_meta.TransferSyntaxUID)
    out: list[str] = []
    syntax_changed = sent_ts != recv_ts
    skip = SYNTAX_DEPENDENT if syntax_changed else frozenset({PIXEL_DATA})
    _compare_datasets(sent, received, _endianness(sent), _endianness(received), "", skip, out)
    if (PIXEL_DATA in sent) != (PIXEL_DATA in received):
        out.append("Pixel Data present in only one of the objects")
        return out
    if PIXEL_DATA not in sent:
        return out
    if not syntax_changed:
        a = _value_bytes(sent._dict[PIXEL_DATA], *_endianness(sent))  # still raw: skipped
        b = _value_bytes(received._dict[PIXEL_DATA], *_endianness(received))
        if sent_ts.is_encapsulated:
            a_frags = list(generate_fragments(a))
            b_frags = list(generate_fragments(b))
            if len(a_frags) != len(b_frags) or not all(
                _same_bytes(x, y, None) for x, y in zip(a_frags, b_frags, strict=True)
            ):
                out.append(
                    f"encapsulated Pixel Data differs ({len(a_frags)} fragments, {len(a)} "
                    f"bytes sent; {len(b_frags)} fragments, {len(b)} bytes received)"
                )
        elif not _same_bytes(a, b, None):
            out.append(f"Pixel Data bytes differ ({len(a)} sent, {len(b)} received)")
        return out
    if is_lossy(sent_ts) and is_lossy(recv_ts):
        out.append(f"lossy original re-encoded lossily: {sent_ts.name} -> {recv_ts.name}")
    if is_lossy(recv_ts) and not is_lossy(sent_ts):
        out.append(f"lossless original sent in a lossy syntax: {recv_ts.name}")
    try:
        a_px = _pixels(sent)
    except Exception as exc:  # the original does not decode: nothing to compare against
        out.append(f"the sent object does not decode ({type(exc).__name__}: {exc})")
        return out
    b_px = _pixels(received)
    if a_px.shape != b_px.shape or a_px.dtype != b_px.dtype:
        out.append(
            f"pixel arrays differ in shape/dtype: {a_px.shape} {a_px.dtype} vs "
            f"{b_px.shape} {b_px.dtype}"
        )
    elif not np.array_equal(a_px, b_px):
        n = int(np.count_nonzero(a_px != b_px))
        out.append(f"pixel arrays differ in {n} of {a_px.size} samples")
    for tag in SYNTAX_DEPENDENT - {PIXEL_DATA}:
        a_val = sent.get(tag)
        b_val = received.get(tag)
        a_val = None if a_val is None else a_val.value
        b_val = None if b_val is None else b_val.value
        if a_val == b_val:
            continue
        if tag == Tag(0x0028, 0x0004) and str(a_val).startswith("YBR") and b_val == "RGB":
            continue
        if tag == Tag(0x0028, 0x0006):
            continue  # any planar configuration is fine for the decoded pixels compared above
        out.append(f"{Tag(tag)} changed from {a_val!r} to {b_val!r}")
    return out
