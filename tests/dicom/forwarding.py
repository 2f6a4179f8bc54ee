"""Copies of a Part-10 object as a forwarding peer (Orthanc, a DCMTK-based router) writes
them: the same content in another encoding."""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

TRAILING_PADDING = Tag(0xFFFC, 0xFFFC)
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST"})


def _undefined_lengths(ds: Dataset) -> None:
    """Sequences and items of undefined length, at every depth."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


def with_group_lengths(ds: Dataset) -> bytes:
    """The object in implicit VR with a group length element (gggg,0000) before each group
    of its data set (pydicom writes none)."""
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    groups: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_data_element(fp, elem, ds._character_set)
        groups[elem.tag.group] = groups.get(elem.tag.group, b"") + fp.getvalue()
    shell = Dataset()
    shell.file_meta = ds.file_meta
    out = BytesIO()
    dcmwrite(out, shell, enforce_file_format=True)
    for group, encoded in sorted(groups.items()):
        out.write(struct.pack("<HHII", group, 0, 4, len(encoded)) + encoded)
    return out.getvalue()


def forwarded(part10: bytes) -> bytes:
    """The object as a forwarding peer sends it: Data Set Trailing Padding dropped, all-space
    text values emptied, implicit VR with group lengths (when the pixel data is native), and
    sequences and items of undefined length."""
    ds = dcmread(BytesIO(part10))
    if TRAILING_PADDING in ds:
        del ds[TRAILING_PADDING]
    for elem in ds.iterall():
        if elem.VR in _TEXT_VRS and isinstance(elem.value, str) and not elem.value.strip(" "):
            elem.value = ""
    _undefined_lengths(ds)
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return with_group_lengths(ds)
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()
