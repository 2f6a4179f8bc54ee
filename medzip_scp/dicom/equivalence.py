"""Whether two Part-10 objects carry the same content, however each sender encoded it.

A peer that forwards an instance (Orthanc, any DCMTK-based router) re-writes it: it drops
group length elements and Data Set Trailing Padding, may switch between explicit and
implicit VR, between defined and undefined sequence and item lengths, and may pad or trim
values differently. None of that carries information, so a copy that differs only so is
the same instance, not a conflicting duplicate. :func:`first_difference` compares two
objects element by element after these encodings; it reads both data sets in place
(no value is copied or decoded), so its memory is that of the two objects plus one small
record per element.

Tolerated (equal after):

* group length elements (gggg,0000), at any depth, and Data Set Trailing Padding
  (FFFC,FFFC) (PS3.5 7.2, PS3.10 7.2);
* explicit or implicit VR little endian, and the VR a sender wrote (UN for a known
  attribute, OB or OW): values are compared as bytes, which both encodings share; an
  implicit VR sequence inside UN (PS3.5 6.2.2) is read as the sequence it is;
* defined or undefined lengths of sequences and items;
* value padding (PS3.5 6.2): trailing spaces and NULs of text values (each value of a
  multi-valued one), also leading spaces where PS3.5 calls them insignificant (AE, CS, DS,
  IS, LO, SH), trailing NULs and spaces of UI values, so an all-space value equals an empty
  one; the single pad byte of an odd-length binary value;
* an empty Basic Offset Table of encapsulated Pixel Data against a filled one (it only
  locates frames that the fragments themselves delimit).

Not tolerated, reported as a difference: any other value, an added or missing element,
another number of sequence items, a fragment of encapsulated Pixel Data that differs, and
Pixel Data in another transfer syntax when either is encapsulated. Deciding the last one
would need both objects decoded (memory of the full pixel matrix, seconds of CPU for a
multi-frame object) for a case that only a transcoding peer produces; such a copy goes
through the duplicate policy like any other differing one. Big endian and deflated data
sets are not compared either (reported as a difference at the Transfer Syntax UID), nor
objects of more than :data:`MAX_ELEMENTS` elements (memory).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from medzip_scp.dicom.part10 import LONG_LENGTH_VRS, file_meta_of, implicit_vr_of

__all__ = ["first_difference", "same_content"]

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_TRAILING_PADDING = 0xFFFCFFFC
_TRANSFER_SYNTAX = "(0002,0010)"
_MAX_DEPTH = 64  # nested sequences; a deeper object is not compared
# Elements, items and fragments of one object: each costs about 450 bytes here, so this bounds
# the memory of a comparison (a 520-frame Enhanced MR has 10,000; a hostile object of 8-byte
# elements could have millions). An object with more is not compared.
MAX_ELEMENTS = 250_000
_TAG_LENGTH = struct.Struct("<HHI")
_TAG_VR_LENGTH = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<I")

# PS3.5 6.2: text values whose leading spaces, too, are insignificant ...
_LEADING_AND_TRAILING = frozenset({"AE", "CS", "DS", "IS", "LO", "SH"})
# ... those where only trailing spaces are (each value of a multi-valued one) ...
_TRAILING = frozenset({"AS", "DA", "DT", "PN", "TM", "UC", "UI"})
# ... and the single-valued texts, where a backslash is text and only the end is padding.
_TRAILING_OF_WHOLE = frozenset({"LT", "ST", "UR", "UT"})


class _Unreadable(Exception):
    """The data set is not one this comparison reads (a malformed encoding, nesting too
    deep, too many elements). The message is fixed text, never a value."""


class _SyntaxNotCompared(Exception):
    """Big endian, deflated, or not a transfer syntax."""


@dataclass(frozen=True, slots=True)
class _Element:
    vr: str | None  # as encoded; None in implicit VR
    value: memoryview  # the value field of a defined-length element
    items: list[dict[int, _Element]] | None = None  # a sequence's items
    fragments: list[memoryview] | None = None  # encapsulated Pixel Data, offset table first


_DataSet = dict[int, "_Element"]


def _is_sequence(tag: int) -> bool:
    """Whether the data dictionary makes an (implicit VR) element a sequence."""
    if tag >> 16 & 1:
        return False  # private: its VR is unknown here
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


class _Reader:
    """Reads a little endian data set (explicit or implicit VR) into elements by tag,
    leaving out those that carry no content."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.left = MAX_ELEMENTS

    def _count(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _Unreadable("too many elements")

    def _tag_and_length(self, pos: int, limit: int) -> tuple[int, int]:
        if pos + 8 > limit:
            raise _Unreadable("cut short")
        self._count()
        group, element, length = _TAG_LENGTH.unpack_from(self.buf, pos)
        return group << 16 | element, length

    def elements(
        self, pos: int, end: int | None, implicit: bool, depth: int
    ) -> tuple[_DataSet, int]:
        """The elements from ``pos`` to ``end``, or (``end`` None) through an Item
        Delimitation Item, and the position after them."""
        if depth > _MAX_DEPTH:
            raise _Unreadable("sequences nested too deep")
        buf = self.buf
        limit = len(buf) if end is None else end
        found: _DataSet = {}
        while end is None or pos != end:
            tag, length = self._tag_and_length(pos, limit)
            if tag == _ITEM_END and end is None:
                return found, pos + 8
            vr: str | None = None
            value = pos + 8
            if not implicit:
                _, _, vr_bytes, length = _TAG_VR_LENGTH.unpack_from(buf, pos)
                if not vr_bytes.isalpha() or not vr_bytes.isupper():
                    raise _Unreadable("not an explicit VR element")
                if vr_bytes in LONG_LENGTH_VRS:
                    if pos + 12 > limit:
                        raise _Unreadable("cut short")
                    (length,) = _LONG_LENGTH.unpack_from(buf, pos + 8)
                    value = pos + 12
                vr = vr_bytes.decode("ascii")
            element: _Element
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and depth == 0:
                    fragments, pos = self.fragments(value, limit)
                    element = _Element(vr, buf[0:0], fragments=fragments)
                elif vr in (None, "SQ", "UN"):  # UN: an implicit VR sequence (PS3.5 6.2.2)
                    items, pos = self.items(value, None, implicit or vr == "UN", depth + 1)
                    element = _Element(vr, buf[0:0], items=items)
                else:
                    raise _Unreadable("undefined length of a value")
            else:
                pos = value + length
                if pos > limit:
                    raise _Unreadable("cut short")
                sequence = vr == "SQ" or (vr is None and _is_sequence(tag))
                items = self.items(value, pos, implicit, depth + 1)[0] if sequence else None
                element = _Element(vr, buf[value:pos], items=items)
            if tag & 0xFFFF and tag != _TRAILING_PADDING:  # group lengths carry nothing
                found[tag] = element
        return found, pos

    def items(
        self, pos: int, end: int | None, implicit: bool, depth: int
    ) -> tuple[list[_DataSet], int]:
        """The items of a sequence value (to ``end``, or through its Sequence Delimitation
        Item), and the position after them."""
        limit = len(self.buf) if end is None else end
        found: list[_DataSet] = []
        while end is None or pos != end:
            tag, length = self._tag_and_length(pos, limit)
            if tag == _SEQUENCE_END and end is None:
                return found, pos + 8
            if tag != _ITEM:
                raise _Unreadable("not an item")
            if length == _UNDEFINED:
                item, pos = self.elements(pos + 8, None, implicit, depth)
            else:
                if pos + 8 + length > limit:
                    raise _Unreadable("cut short")
                item, pos = self.elements(pos + 8, pos + 8 + length, implicit, depth)
            found.append(item)
        return found, pos

    def fragments(self, pos: int, limit: int) -> tuple[list[memoryview], int]:
        """The items of encapsulated Pixel Data through its Sequence Delimitation Item."""
        found: list[memoryview] = []
        while True:
            tag, length = self._tag_and_length(pos, limit)
            if tag == _SEQUENCE_END:
                return found, pos + 8
            if tag != _ITEM or length == _UNDEFINED or pos + 8 + length > limit:
                raise _Unreadable("not a fragment")
            found.append(self.buf[pos + 8 : pos + 8 + length])
            pos += 8 + length


def _read(part10: bytes) -> tuple[UID, _DataSet]:
    """The transfer syntax and the top-level elements of a Part-10 object."""
    offset, syntax_text = file_meta_of(part10)
    syntax = UID(syntax_text)
    implicit = implicit_vr_of(syntax)
    if implicit is None:
        raise _SyntaxNotCompared
    buf = memoryview(part10)
    return syntax, _Reader(buf).elements(offset, len(buf), implicit, 0)[0]


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _vr_for_padding(tag: int, a: _Element, b: _Element) -> str | None:
    """The VR that decides which padding is insignificant: as encoded, else (implicit VR,
    or UN) the dictionary's."""
    for vr in (a.vr, b.vr):
        if vr not in (None, "UN"):
            return vr
    if tag >> 16 & 1:
        return None
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _text_values(value: bytes, vr: str) -> list[bytes]:
    if vr in _TRAILING_OF_WHOLE:
        return [value.rstrip(b" \x00")]
    values = [v.rstrip(b" \x00") for v in value.split(b"\\")]
    if vr in _LEADING_AND_TRAILING:
        values = [v.lstrip(b" ") for v in values]
    return values


def _same_value(a: memoryview, b: memoryview, vr: str | None) -> bool:
    if a == b:
        return True
    if vr in _LEADING_AND_TRAILING or vr in _TRAILING or vr in _TRAILING_OF_WHOLE:
        return _text_values(bytes(a), vr) == _text_values(bytes(b), vr)
    # an odd-length value and the same value with its pad byte (PS3.5 7.1.1)
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return (
        len(short) % 2 == 1 and len(long) == len(short) + 1 and long[-1] == 0 and long[:-1] == short
    )


def _as_items(element: _Element, depth: int) -> list[_DataSet] | None:
    """A sequence's items; a sequence written as UN or unknown bytes (PS3.5 6.2.2) is read
    as implicit VR items; None when those bytes are not items."""
    if element.items is not None:
        return element.items
    if element.fragments is not None:
        return None
    try:
        return _Reader(element.value).items(0, len(element.value), True, depth)[0]
    except (_Unreadable, struct.error):
        return None


def _same_fragments(a: list[memoryview], b: list[memoryview]) -> bool:
    if len(a) != len(b) or not a:
        return len(a) == len(b)
    offsets_agree = a[0] == b[0] or not len(a[0]) or not len(b[0])
    return offsets_agree and all(x == y for x, y in zip(a[1:], b[1:], strict=True))


def _difference_in(a: _DataSet, b: _DataSet, path: str, depth: int) -> str | None:
    """Where the first (lowest tag) difference between two data sets is, or None."""
    for tag in sorted(a.keys() | b.keys()):
        where = f"{path}{_tag_text(tag)}"
        if tag not in a or tag not in b:
            return where
        x, y = a[tag], b[tag]
        if x.fragments is not None or y.fragments is not None:
            if x.fragments is None or y.fragments is None:
                return where
            if not _same_fragments(x.fragments, y.fragments):
                return where
            continue
        if x.items is not None or y.items is not None:
            x_items, y_items = _as_items(x, depth + 1), _as_items(y, depth + 1)
            if x_items is None or y_items is None or len(x_items) != len(y_items):
                return where
            for i, (x_item, y_item) in enumerate(zip(x_items, y_items, strict=True)):
                found = _difference_in(x_item, y_item, f"{where}[{i}]", depth + 1)
                if found is not None:
                    return found
            continue
        if not _same_value(x.value, y.value, _vr_for_padding(tag, x, y)):
            return where
    return None


def first_difference(a_part10: bytes, b_part10: bytes) -> str | None:
    """Where two Part-10 objects first differ in content, or None when they carry the same
    data elements and pixel values (see the module's docstring for what is tolerated).

    Returns
    -------
    str or None
        The path of tags to the first differing element, such as ``(0008,1140)[0](0008,1155)``
        (tags and item numbers only, never a value: fit for a log); ``(0002,0010)`` when
        their transfer syntaxes are not compared; ``not compared: <reason>`` for an
        encoding this comparison does not read or an object over :data:`MAX_ELEMENTS`.
    """
    try:
        a_syntax, a = _read(a_part10)
        b_syntax, b = _read(b_part10)
    except _SyntaxNotCompared:
        return _TRANSFER_SYNTAX
    except _Unreadable as exc:
        return f"not compared: {exc}"
    except (struct.error, ValueError):
        return "not compared: unreadable"
    other_pixel_encoding = a_syntax != b_syntax and (
        a_syntax.is_encapsulated or b_syntax.is_encapsulated
    )
    if other_pixel_encoding and (_PIXEL_DATA in a or _PIXEL_DATA in b):
        a.pop(_PIXEL_DATA, None)
        b.pop(_PIXEL_DATA, None)
        return _difference_in(a, b, "", 0) or _tag_text(_PIXEL_DATA)
    return _difference_in(a, b, "", 0)


def same_content(a_part10: bytes, b_part10: bytes) -> bool:
    """Whether two Part-10 objects carry the same content (see :func:`first_difference`)."""
    return first_difference(a_part10, b_part10) is None
