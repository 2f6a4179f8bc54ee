"""Bounded fuzzing of C-STORE: mutated real files sent while a good peer keeps storing.

A fixed number of cases, each a real file (``../shared/data`` and pydicom's test files) with a
fresh SOP Instance UID and one mutation drawn from a deterministic seed (case ``i`` depends
only on ``SEED`` and ``i``: :func:`build_case` rebuilds any single case). Each case is written
as a Part-10 file and sent by pynetdicom's SCU from that file (chunked), so the node receives
exactly the mutated encoding, in the presentation context its File Meta names. Meanwhile a
second association streams valid files.

What must hold:

* every mutated file gets a C-STORE response with a valid status: a failure for objects that
  are not valid DICOM any more (cut short, an element running past the end, an unknown VR,
  bad characters in a study, series or SOP Instance UID, broken fragment items), Success for
  native pixel values changed, either for the rest (bytes flipped, odd lengths, deep
  sequences, File Meta inside the data set, another transfer syntax); never 0xA7xx (no
  resource ran out: that status would make the peer retry forever) nor pynetdicom's 0xC211
  (an exception escaped the handler);
* every valid file of the good sender is stored (Success);
* the node still answers C-ECHO; the spool holds no leftover transfers;
* index and blob store agree (one blob per row, no blob without a row), a refused object has
  no row, a stored one has its row, and ``medzip verify`` finds every instance intact;
* every stored instance comes back by C-GET, in the syntax it was stored in, with the same
  data elements as were sent (``dicom_compare.differences``; an object stored although
  pydicom cannot read what was sent fails here).

Run with ``-s`` for a table of the statuses per mutation and the list of problems.

The second test sends a subset to a node with background compression on and checks the
same after the compressed blobs replaced the originals.
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification
from sqlalchemy import select

from medzip_scp.config import Settings
from medzip_scp.dicom.part10 import LONG_LENGTH_VRS, dataset_offset_of
from medzip_scp.index.models import Instance, Series, Study
from medzip_scp.instance_codecs import IdentityCodec
from medzip_scp.net.status import Status
from medzip_scp.net.supervisor import start_compression
from medzip_scp.pipeline.compress import pending_ids
from medzip_scp.pipeline.verify import verify_archive
from tests.data_paths import PYDICOM_FILES, SHARED_DATA
from tests.helpers.node import RunningNode
from tests.net.dicom_compare import differences

pytestmark = pytest.mark.slow

SEED = 20261205
CASES = 300
COMPRESSED_CASES = 30  # the subset sent to a node that compresses in the background
COMPRESSED_BASE_BYTES = 32_000  # small objects only: the codec takes ~0.1-1 s per image
MAX_BASE_BYTES = 700_000
CONTEXTS_PER_ASSOCIATION = 100  # PS3.8 allows 128
TIMEOUT = 30.0  # seconds without a response before the SCU gives up (pynetdicom's default)

PYDICOM_BASES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "image_dfl.dcm",
    "rtplan.dcm",
    "test-SR.dcm",
    "reportsi.dcm",
    "liver_1frame.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "ExplVR_BigEnd.dcm",
    "waveform_ecg.dcm",
)
SHARED_BASES = (  # globs under ../shared/data; the first file of each series glob
    "conformance/*/*.dcm",
    "mr-epi/ax/*/*",
    "mr-epi/axmb/*/*",
    "series/ct-phantom-1mm/*",
    "series/mr-t1-3d/*",
    "series/fmri-ge/*/*",
)

STORED = frozenset({Status.SUCCESS, 0xB000, 0xB006, 0xB007})  # PS3.4 B.2.3: Success, Warning
HANDLER_RAISED = 0xC211  # pynetdicom's answer when the C-STORE handler raises

ITEM, ITEM_END, SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
STUDY_SERIES_UIDS = {0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID"}
SOP_INSTANCE_UID = 0x00080018
SEQUENCE_TAGS = (0x0040A730, 0x00081115, 0x00400275, 0x00081140)  # public SQ tags
WRONG_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEG2000Lossless,
    RLELossless,
    JPEGLSLossless,
)


class Expect(Enum):
    """What a correct node answers to a mutated object."""

    REFUSAL = "refusal"  # it is not valid DICOM any more: a failure status
    SUCCESS = "success"  # still a valid object: stored
    EITHER = "either"  # valid or not depending on details: any valid status


# -- encoding ---------------------------------------------------------------------------


def encode_element(tag: int, vr: bytes, value: bytes, implicit: bool) -> bytes:
    """One little-endian data element (``value`` as given, even if of odd length)."""
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", group, element, len(value)) + value
    if vr in LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    data = value.encode("latin-1")
    return data + b"\0" * (len(data) % 2)


@dataclass(frozen=True)
class Meta:
    """What the File Meta names: pynetdicom builds the C-STORE request and picks the
    presentation context from these."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str

    def group(self) -> bytes:
        """The File Meta elements after their group length, written by hand so that even
        invalid UIDs go out exactly as given."""
        return b"".join(
            encode_element(0x00020000 | element, vr, value, implicit=False)
            for element, vr, value in (
                (0x0001, b"OB", b"\0\1"),
                (0x0002, b"UI", _ui(self.sop_class_uid)),
                (0x0003, b"UI", _ui(self.sop_instance_uid)),
                (0x0010, b"UI", _ui(self.transfer_syntax)),
                (0x0012, b"UI", _ui("1.2.826.0.1.3680043.10.1398.1")),
            )
        )

    def part10(self, body: bytes) -> bytes:
        group = self.group()
        length = encode_element(0x00020000, b"UL", struct.pack("<I", len(group)), False)
        return b"\0" * 128 + b"DICM" + length + group + body


# -- bases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """A real file the cases start from."""

    name: str
    part10: bytes
    sop_class_uid: str
    transfer_syntax: UID
    has_pixel_data: bool

    @property
    def implicit(self) -> bool:
        return self.transfer_syntax == ImplicitVRLittleEndian

    @property
    def little_endian(self) -> bool:
        """Little endian and not deflated: the mutations that need the element layout."""
        ts = self.transfer_syntax
        return ts.is_little_endian and not ts.is_deflated

    def with_uids(self, sop_instance_uid: str, new_study: bool = False) -> bytes:
        """The data set (without File Meta) re-encoded by pydicom with a new SOP Instance
        UID (and, for ``new_study``, new study and series UIDs)."""
        ds = dcmread(BytesIO(self.part10))
        ds.SOPInstanceUID = sop_instance_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        if new_study:
            ds.StudyInstanceUID = generate_uid(entropy_srcs=[sop_instance_uid, "study"])
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[sop_instance_uid, "series"])
        out = BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
        data = out.getvalue()
        return data[dataset_offset_of(data) :]


def _shared_files() -> list[Path]:
    if not SHARED_DATA.is_dir():
        return []
    files: list[Path] = []
    for pattern in SHARED_BASES:
        found = sorted(p for p in SHARED_DATA.glob(pattern) if p.is_file())
        files += found if pattern.startswith("conformance") else found[:1]
    return files


def load_bases() -> list[Base]:
    """The real files to mutate: small enough to keep the test bounded, with the UIDs the
    node indexes, and re-encodable by pydicom."""
    bases = []
    named = [(PYDICOM_FILES / name, f"pydicom/{name}") for name in PYDICOM_BASES]
    named += [(path, path.relative_to(SHARED_DATA).as_posix()) for path in _shared_files()]
    for path, name in named:
        if path.stat().st_size > MAX_BASE_BYTES:
            continue
        data = path.read_bytes()
        ds = dcmread(BytesIO(data))
        if not all(str(ds.get(k, "")).strip() for k in ("StudyInstanceUID", "SeriesInstanceUID")):
            continue  # not storable as it is (0xC001)
        base = Base(
            name=name,
            part10=data,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax=UID(ds.file_meta.TransferSyntaxUID),
            has_pixel_data="PixelData" in ds,
        )
        base.with_uids("1.2.3")  # raises for a file pydicom cannot write again
        bases.append(base)
    return bases


# -- mutations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """A top-level data element of an encoded data set."""

    tag: int
    vr: str | None  # None: implicit VR
    start: int  # of its header
    value: int  # of its value
    length: int  # as encoded (UNDEFINED for undefined length)
    end: int  # where the next element starts

    @property
    def length_field(self) -> tuple[int, str]:
        """Offset and struct format of the length field."""
        if self.vr is None or self.value - self.start == 12:
            return self.value - 4, "<I"
        return self.value - 2, "<H"


def top_level(body: bytes, implicit: bool) -> list[Element]:
    """The top-level elements of a little-endian data set, as pydicom reads them."""
    ds = read_dataset(BytesIO(body), implicit, True)
    # pydicom parses sequences while reading: a DataElement with the value's offset
    values = {tag: getattr(e, "value_tell", None) or e.file_tell for tag, e in ds._dict.items()}
    tags = sorted(ds._dict, key=values.__getitem__)
    starts = []
    for tag in tags:
        vr = ds._dict[tag].VR
        long = not implicit and vr.encode() in LONG_LENGTH_VRS
        starts.append(values[tag] - (12 if long else 8))
    ends = starts[1:] + [len(body)]
    elements = []
    for tag, start, end in zip(tags, starts, ends, strict=True):
        raw = ds._dict[tag]
        if hasattr(raw, "length"):
            length = raw.length
        else:
            length = UNDEFINED if raw.is_undefined_length else end - values[tag]
        vr = None if implicit else raw.VR
        elements.append(Element(int(tag), vr, start, values[tag], length, end))
    return elements


@dataclass
class Sample:
    """A base with a fresh SOP Instance UID, ready to be mutated."""

    base: Base
    meta: Meta
    body: bytes

    @property
    def implicit(self) -> bool:
        return self.base.implicit

    def elements(self) -> list[Element]:
        return top_level(self.body, self.implicit)

    def pixel_data(self) -> Element | None:
        return next((e for e in self.elements() if e.tag == PIXEL_DATA), None)


@dataclass
class Mutated:
    body: bytes
    meta: Meta
    detail: str
    expect: Expect


@dataclass(frozen=True)
class Mutation:
    applies: Callable[[Base], bool]
    apply: Callable[[random.Random, Sample], Mutated]


def _flip(data: bytes, positions: list[int], rng: random.Random) -> bytes:
    out = bytearray(data)
    for position in positions:
        out[position] ^= rng.randrange(1, 256)
    return bytes(out)


def truncate(rng: random.Random, s: Sample) -> Mutated:
    """Cut the data set inside one element (its header or value): never a whole object."""
    element = rng.choice(s.elements())
    cut = rng.randrange(element.start + 1, element.end)
    where = "header" if cut < element.value else "value"
    return Mutated(s.body[:cut], s.meta, f"cut in {where} of {element.tag:08X}", Expect.REFUSAL)


def flip_header(rng: random.Random, s: Sample) -> Mutated:
    pixel = s.pixel_data() if s.base.little_endian else None
    end = pixel.start if pixel is not None else len(s.body)
    positions = sorted(rng.sample(range(end), rng.randint(1, 3)))
    return Mutated(_flip(s.body, positions, rng), s.meta, f"bytes {positions}", Expect.EITHER)


def flip_pixels(rng: random.Random, s: Sample) -> Mutated:
    """Native pixel values are any bytes: the object stays valid."""
    pixel = s.pixel_data()
    assert pixel is not None
    positions = sorted(rng.sample(range(pixel.value, pixel.end), 4))
    return Mutated(_flip(s.body, positions, rng), s.meta, f"bytes {positions}", Expect.SUCCESS)


def _with_length(body: bytes, element: Element, length: int) -> bytes:
    offset, fmt = element.length_field
    return body[:offset] + struct.pack(fmt, length) + body[offset + struct.calcsize(fmt) :]


def length_huge(rng: random.Random, s: Sample) -> Mutated:
    """A defined length running past the end of the data set (where no element has a
    length field wide enough for that: the largest length, 0xFFFF)."""
    defined = [e for e in s.elements() if e.length != UNDEFINED]
    beyond = [e for e in defined if e.length_field[1] == "<I" or len(s.body) - e.value < 0xFFFE]
    element = rng.choice(beyond or defined)
    left = len(s.body) - element.value
    if element.length_field[1] == "<H":
        length = 0xFFFE if beyond else 0xFFFF
    else:
        length = rng.choice([0xFFFFFFFE, 0xFFFFFFF0, 0x7FFFFFFE, left + 2 * rng.randint(1, 999)])
    return Mutated(
        _with_length(s.body, element, length),
        s.meta,
        f"{element.tag:08X} length {length:#x}",
        Expect.REFUSAL if beyond else Expect.EITHER,
    )


def length_odd(rng: random.Random, s: Sample) -> Mutated:
    element = rng.choice([e for e in s.elements() if e.length not in (0, UNDEFINED)])
    length = element.length + rng.choice([-1, 1])
    return Mutated(
        _with_length(s.body, element, length),
        s.meta,
        f"{element.tag:08X} length {element.length} -> {length}",
        Expect.EITHER,
    )


def vr_unknown(rng: random.Random, s: Sample) -> Mutated:
    element = rng.choice(s.elements())
    vr = rng.choice([b"ZZ", b"XX", b"??", b"\0\0", b"ab", b"Q1"])
    body = s.body[: element.start + 4] + vr + s.body[element.start + 6 :]
    return Mutated(body, s.meta, f"{element.tag:08X} VR {element.vr} -> {vr!r}", Expect.REFUSAL)


def _nested(tag: int, depth: int, implicit: bool) -> bytes:
    """A sequence nested ``depth`` deep, items and sequences of undefined length."""
    value = encode_element(0x0040A010, b"CS", b"CONTAINS", implicit)  # Relationship Type
    group, element = tag >> 16, tag & 0xFFFF
    header = (
        struct.pack("<HHI", group, element, UNDEFINED)
        if implicit
        else struct.pack("<HH2sHI", group, element, b"SQ", 0, UNDEFINED)
    )
    for _ in range(depth):
        value = (
            header
            + ITEM
            + struct.pack("<I", UNDEFINED)
            + value
            + ITEM_END
            + b"\0" * 4
            + SEQUENCE_END
            + b"\0" * 4
        )
    return value


def deep_sequence(rng: random.Random, s: Sample) -> Mutated:
    """Valid, but deep: the node may store it (then it must give it back) or refuse it."""
    elements = s.elements()
    present = {e.tag for e in elements}
    tag = next(t for t in SEQUENCE_TAGS if t not in present)
    depth = rng.choice([4, 33, 100, 300, 1500])
    at = next((e.start for e in elements if e.tag > tag), len(s.body))
    body = s.body[:at] + _nested(tag, depth, s.implicit) + s.body[at:]
    return Mutated(body, s.meta, f"depth {depth}", Expect.EITHER)


def meta_in_dataset(rng: random.Random, s: Sample) -> Mutated:
    """File Meta again inside the data set: the whole Part-10 file sent as the data set (a
    sender's mistake), or the group 0002 elements after the data set's first element. (At
    the start of the data set they would be read as File Meta by the sender itself; a File
    Meta removed or changed otherwise never reaches the node: DIMSE carries none, the node
    builds it from the request and the presentation context.)"""
    if rng.random() < 0.5:
        return Mutated(s.meta.part10(s.body), s.meta, "whole file as data set", Expect.EITHER)
    first = s.elements()[0] if s.base.little_endian else None
    at = first.end if first is not None else 0
    if at == 0:  # not walkable: before the last 8 bytes, wherever that is
        at = len(s.body) - 8
    body = s.body[:at] + s.meta.group() + s.body[at:]
    return Mutated(body, s.meta, f"group 0002 at offset {at}", Expect.EITHER)


def wrong_syntax(rng: random.Random, s: Sample) -> Mutated:
    """The data set sent in a presentation context of another transfer syntax."""
    other = rng.choice([ts for ts in WRONG_SYNTAXES if ts != s.meta.transfer_syntax])
    meta = Meta(s.meta.sop_class_uid, s.meta.sop_instance_uid, other)
    return Mutated(s.body, meta, f"sent as {UID(other).name}", Expect.EITHER)


def bad_uid_characters(rng: random.Random, s: Sample) -> Mutated:
    """A character that no UID may hold (PS3.5 9.1: digits and '.') inside an identifying
    UID; a bad SOP Instance UID is named by the request too, so only the value is wrong."""
    targets = [e for e in s.elements() if e.tag in STUDY_SERIES_UIDS or e.tag == SOP_INSTANCE_UID]
    element = rng.choice(targets)
    value = s.body[element.value : element.end].rstrip(b"\0 ")
    position = rng.randrange(1, len(value) - 1)
    meta = s.meta
    if element.tag == SOP_INSTANCE_UID:
        char = rng.choice([b"A", b"x", b" ", b"-", b"/", b","])
        new = value[:position] + char + value[position + 1 :]
        meta = Meta(s.meta.sop_class_uid, new.decode("ascii"), s.meta.transfer_syntax)
    else:
        char = rng.choice([b"A", b"x", b" ", b"-", b"/", b",", b"\xff", b"*"])
        new = value[:position] + char + value[position + 1 :]
    body = s.body[: element.value] + new + s.body[element.value + len(new) :]
    name = STUDY_SERIES_UIDS.get(element.tag, "SOPInstanceUID")
    return Mutated(body, meta, f"{name} holds {char!r}", Expect.REFUSAL)


def _fragments(body: bytes, pixel: Element) -> list[tuple[int, int]]:
    """Value spans of the items of encapsulated Pixel Data (the first: the offset table)."""
    spans = []
    position = pixel.value
    while body[position : position + 4] == ITEM:
        (length,) = struct.unpack_from("<I", body, position + 4)
        spans.append((position + 8, position + 8 + length))
        position += 8 + length
    return spans


def corrupt_fragments(rng: random.Random, s: Sample) -> Mutated:
    pixel = s.pixel_data()
    assert pixel is not None
    spans = _fragments(s.body, pixel)
    start, end = rng.choice(spans[1:])
    how = rng.choice(
        ["stream header", "stream data", "item tag", "item length", "no delimiter", "offsets"]
    )
    body = s.body
    expect = Expect.REFUSAL
    if how.startswith("stream"):  # the compressed stream (its first markers): may not decode
        span = range(start, min(end, start + 32)) if how == "stream header" else range(start, end)
        body, expect = _flip(body, rng.sample(span, min(4, len(span))), rng), Expect.EITHER
    elif how == "item tag":  # PS3.5 A.4: every fragment is an Item
        tag = rng.choice([b"\xfe\xff\x01\xe0", b"\0\0\0\0", b"\xe0\x7f\x10\x00"])
        body = body[: start - 8] + tag + body[start - 4 :]
    elif how == "item length":  # past the end of the data set
        length = len(body) - start + 2 * rng.randint(1, 999)
        body = body[: start - 4] + struct.pack("<I", length) + body[start:]
    elif how == "no delimiter":
        after = spans[-1][1]
        assert body[after : after + 4] == SEQUENCE_END
        body = body[:after] + body[after + 8 :]
    else:  # offset table values pointing anywhere: a reader must not trust them
        table_start, table_end = spans[0]
        if table_end == table_start:
            entries = struct.pack("<II", 0, 0x7FFFFFF0)
            body = body[: table_start - 4] + struct.pack("<I", 8) + entries + body[table_start:]
        else:
            body = _flip(body, [rng.randrange(table_start, table_end)], rng)
        expect = Expect.EITHER
    return Mutated(body, s.meta, how, expect)


def random_bytes(rng: random.Random, s: Sample) -> Mutated:
    positions = sorted(rng.sample(range(len(s.body)), rng.randint(1, 8)))
    return Mutated(_flip(s.body, positions, rng), s.meta, f"{len(positions)} bytes", Expect.EITHER)


def _encapsulated(base: Base) -> bool:
    return base.little_endian and base.transfer_syntax.is_encapsulated


MUTATIONS: dict[str, Mutation] = {
    "truncate": Mutation(lambda b: b.little_endian, truncate),
    "flip_header": Mutation(lambda b: True, flip_header),
    "flip_pixels": Mutation(
        lambda b: b.little_endian and b.has_pixel_data and not b.transfer_syntax.is_encapsulated,
        flip_pixels,
    ),
    "length_huge": Mutation(lambda b: b.little_endian, length_huge),
    "length_odd": Mutation(lambda b: b.little_endian, length_odd),
    "vr_unknown": Mutation(lambda b: b.little_endian and not b.implicit, vr_unknown),
    "deep_sequence": Mutation(lambda b: b.little_endian, deep_sequence),
    "meta_in_dataset": Mutation(lambda b: True, meta_in_dataset),
    "wrong_syntax": Mutation(lambda b: True, wrong_syntax),
    "bad_uid": Mutation(lambda b: b.little_endian, bad_uid_characters),
    "fragments": Mutation(_encapsulated, corrupt_fragments),
    "random_bytes": Mutation(lambda b: True, random_bytes),
}
KINDS = tuple(MUTATIONS)


@dataclass
class FuzzCase:
    index: int
    kind: str
    detail: str
    base: str
    meta: Meta
    expect: Expect
    path: Path  # the Part-10 file sent


def build_case(index: int, bases: list[Base], directory: Path) -> FuzzCase:
    """Case ``index``, written to ``directory``: its mutation kind by turn, its base and
    mutation drawn by a generator seeded with ``SEED`` and ``index`` only."""
    rng = random.Random(f"{SEED}:{index}")
    kind = KINDS[index % len(KINDS)]
    mutation = MUTATIONS[kind]
    base = rng.choice([b for b in bases if mutation.applies(b)])
    uid = generate_uid(entropy_srcs=[str(SEED), str(index)])
    meta = Meta(base.sop_class_uid, uid, str(base.transfer_syntax))
    mutated = mutation.apply(rng, Sample(base, meta, base.with_uids(uid)))
    path = directory / f"{index:03d}-{kind}.dcm"
    path.write_bytes(mutated.meta.part10(mutated.body))
    return FuzzCase(index, kind, mutated.detail, base.name, mutated.meta, mutated.expect, path)


# -- sending ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no C-STORE response
    error: str = ""  # what the SCU met instead

    def __str__(self) -> str:
        return f"0x{self.status:04X}" if self.status is not None else self.error


def _ae(calling: str) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    return ae


def _associate(node: RunningNode, ae: AE, **kwargs: object) -> Association:
    """Associate, and send each PDU at once (TCP_NODELAY, as DCMTK's SCUs do): without it
    every request waits ~40 ms for the peer's delayed ACK."""
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, **kwargs)  # type: ignore[arg-type]
    assert assoc.is_established, f"{ae.ae_title}: no association with the node"
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


@contextmanager
def association(
    node: RunningNode, calling: str, contexts: set[tuple[str, str]]
) -> Iterator[Association]:
    ae = _ae(calling)
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    assoc = _associate(node, ae)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def send_file(assoc: Association, path: Path) -> Answer:
    """C-STORE the data set bytes of a Part-10 file as they are (chunked sending)."""
    if not assoc.is_established:
        return Answer(None, "association gone before the request")
    try:
        rsp = assoc.send_c_store(path)
    except Exception as exc:
        return Answer(None, f"SCU raised {type(exc).__name__}: {exc}")
    if "Status" not in rsp:
        gone = "" if assoc.is_established else ", association aborted"
        return Answer(None, f"no response{gone}")
    return Answer(int(rsp.Status))


def _context(path: Path) -> tuple[str, str]:
    """The presentation context pynetdicom sends a file in: it reads every group 0002
    element at the start of the file as File Meta (the last of a repeated one wins)."""
    meta, _ = split_dataset(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def send_cases(node: RunningNode, cases: list[FuzzCase]) -> dict[int, Answer]:
    """Send each case once, on as few associations as the contexts allow; a new association
    after one is lost (the answer that lost it is recorded)."""
    answers: dict[int, Answer] = {}
    while pending := [c for c in cases if c.index not in answers]:
        contexts: set[tuple[str, str]] = set()
        chunk = []
        for case in pending:
            wanted = contexts | {_context(case.path)}
            if len(wanted) > CONTEXTS_PER_ASSOCIATION:
                break
            contexts, chunk = wanted, [*chunk, case]
        with association(node, "FUZZSCU", contexts) as assoc:
            for case in chunk:
                answers[case.index] = send_file(assoc, case.path)
                if not assoc.is_established:
                    break
    return answers


@dataclass(eq=False)  # a thread must stay hashable
class GoodSender(threading.Thread):
    """Streams valid files on its own association until told to stop (at least once
    each; later passes resend identical copies, which must succeed too)."""

    node: RunningNode
    files: list[tuple[Path, Meta]]
    answers: list[tuple[Path, Answer]] = field(default_factory=list)
    finish: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        super().__init__(name="good-sender", daemon=True)

    def run(self) -> None:
        try:
            contexts = {_context(path) for path, _ in self.files}
            with association(self.node, "GOODSCU", contexts) as assoc:
                while not self.answers or not self.finish.is_set():
                    for path, _meta in self.files:
                        self.answers.append((path, send_file(assoc, path)))
        except BaseException as exc:
            self.error = exc


# -- checking ---------------------------------------------------------------------------


def judge(case: FuzzCase, answer: Answer) -> str | None:
    """What is wrong with the node's answer to a case (None: nothing)."""
    status = answer.status
    if status is None:
        return f"no C-STORE response ({answer.error})"
    if status in STORED:
        return (
            "stored, but the object is not valid DICOM" if case.expect is Expect.REFUSAL else None
        )
    if status == HANDLER_RAISED:
        return "0xC211: an exception escaped the C-STORE handler"
    if status >> 8 == 0xA7:
        return f"0x{status:04X} Out of Resources for a data set problem (the peer would retry)"
    if status in (0x0111, 0x0117, 0x0122) or status >> 8 == 0xA9 or status >> 12 == 0xC:
        return "refused a valid object" if case.expect is Expect.SUCCESS else None
    return f"0x{status:04X} is not a C-STORE status"


def summary_table(cases: list[FuzzCase], answers: dict[int, Answer]) -> str:
    by_kind: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    for case in cases:
        by_kind[case.kind][str(answers[case.index])] += 1
    columns = sorted({label for counts in by_kind.values() for label in counts})
    lines = ["| mutation | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for kind, counts in by_kind.items():
        if counts:
            lines.append(f"| {kind} | " + " | ".join(str(counts[c]) for c in columns) + " |")
    return "\n".join(lines)


@dataclass
class Row:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    blob_key: str
    codec_id: str


def index_rows(node: RunningNode) -> list[Row]:
    with node.archive.sessions() as session:
        result = session.execute(
            select(
                Instance.sop_instance_uid,
                Instance.sop_class_uid,
                Instance.transfer_syntax_uid,
                Study.study_instance_uid,
                Instance.blob_key,
                Instance.codec_id,
            )
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
        )
        return [Row(*values) for values in result]


def check_archive(node: RunningNode, stored: dict[str, Path], refused: set[str]) -> list[str]:
    """Index, blob store, verification and spool after the run."""
    problems = []
    rows = index_rows(node)
    by_uid = {row.sop_instance_uid: row for row in rows}
    row_keys = Counter(row.blob_key for row in rows)
    blob_keys = set(node.archive.blobs.keys())
    problems += [f"index: blob {k} named by {n} rows" for k, n in row_keys.items() if n > 1]
    problems += [f"index: row's blob {k} is missing" for k in sorted(set(row_keys) - blob_keys)]
    problems += [f"blobs: {k} is named by no row" for k in sorted(blob_keys - set(row_keys))]
    problems += [f"index: stored {uid} has no row" for uid in sorted(set(stored) - set(by_uid))]
    problems += [f"index: refused {uid} has a row" for uid in sorted(refused & set(by_uid))]
    unknown = set(by_uid) - set(stored) - refused
    problems += [f"index: row for {uid}, which no answer stored" for uid in sorted(unknown)]
    report = verify_archive(node.archive)
    problems += [f"verify: {uid}: {what}" for uid, what in report.problems]
    if report.checked != len(rows):
        problems.append(f"verify checked {report.checked} of {len(rows)} instances")
    spool = node.settings.storage.incoming_dir()
    left = [p for p in spool.rglob("*") if p.is_file()]
    problems += [f"spool: {len(left)} transfers left behind"] if left else []
    return problems


def retrieve_all(node: RunningNode, directory: Path) -> tuple[dict[str, Path], list[str]]:
    """C-GET every stored study, each object in the syntax it was stored in; returns the
    files received by SOP Instance UID, and what went wrong."""
    rows = index_rows(node)
    received: dict[str, Path] = {}
    problems: list[str] = []

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        target = directory / f"{len(received):04d}.dcm"
        shutil.copyfile(event.dataset_path, target)
        received[uid] = target
        return Status.SUCCESS

    contexts = {(row.sop_class_uid, row.transfer_syntax_uid) for row in rows}
    assert len(contexts) < 128, "too many presentation contexts for one association"
    ae = _ae("GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    roles = [build_role(c, scp_role=True) for c in sorted({c for c, _ in contexts})]
    assoc = _associate(node, ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        for study_uid in sorted({row.study_instance_uid for row in rows}):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study_uid
            responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
            final = responses[-1][0] if responses else Dataset()
            failed = final.get("NumberOfFailedSuboperations", 0)
            if final.get("Status") != Status.SUCCESS or failed:
                status = final.get("Status")
                label = "no response" if status is None else f"0x{status:04X}"
                uids = final.get("FailedSOPInstanceUIDList", [])
                problems.append(f"C-GET study {study_uid}: {label}, failed: {uids or failed}")
    finally:
        if assoc.is_established:
            assoc.release()
    return received, problems


def compare_retrieved(
    stored: dict[str, Path], received: dict[str, Path], flagged: set[str]
) -> list[str]:
    """Every stored object came back; those answered rightly with the data elements sent."""
    problems = []
    for uid, sent in sorted(stored.items()):
        if uid not in received:
            problems.append(f"C-GET: {sent.name}, stored, did not come back")
            continue
        if uid in flagged:
            continue  # its answer was wrong already
        try:
            found = differences(sent, received[uid])
        except Exception as exc:
            found = [f"not comparable ({exc!r:.100})"]
        problems += [f"C-GET: {sent.name}: {difference}" for difference in found[:5]]
    return problems


def echo(node: RunningNode) -> int | None:
    with association(node, "ECHOSCU", {(Verification, ExplicitVRLittleEndian)}) as assoc:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None


def fuzz_node(
    node: RunningNode,
    cases: list[FuzzCase],
    good: list[tuple[Path, Meta]],
    work: Path,
    after_stores: Callable[[], list[str]] = list,
) -> list[str]:
    """Send the cases while a good sender streams; returns every problem found."""
    sender = GoodSender(node, good)
    sender.start()
    started = time.monotonic()
    try:
        answers = send_cases(node, cases)
    finally:
        sender.finish.set()
        sender.join(timeout=120)
    elapsed = time.monotonic() - started
    problems = []
    if sender.is_alive() or sender.error is not None:
        problems.append(f"good sender did not finish: {sender.error!r}")
    stored: dict[str, Path] = {}  # SOP Instance UID -> the file sent
    flagged: set[str] = set()  # answered wrongly already: not compared after C-GET
    meta_of = dict(good)
    wrong = Counter()
    for path, answer in sender.answers:
        uid = meta_of[path].sop_instance_uid
        if answer.status == Status.SUCCESS:
            stored[uid] = path
        else:
            flagged.add(uid)
            wrong[f"good sender: {path.name}: {answer}"] += 1
    problems += [f"{problem} ({n} times)" for problem, n in wrong.items()]
    for case in cases:
        answer = answers[case.index]
        uid = case.meta.sop_instance_uid
        if answer.status in STORED:
            stored[uid] = case.path
        problem = judge(case, answer)
        if problem is not None:
            flagged.add(uid)
            problems.append(
                f"case {case.index} {case.kind} ({case.detail}) on {case.base}: {answer}: {problem}"
            )
    print(f"\n{len(cases)} mutated files in {elapsed:.1f} s, {len(sender.answers)} good stores")
    print(summary_table(cases, answers))
    alive = echo(node)
    if alive != Status.SUCCESS:
        problems.append(f"C-ECHO after the run: {alive}")
    problems += after_stores()
    sent = {c.meta.sop_instance_uid for c in cases} | {m.sop_instance_uid for m in meta_of.values()}
    problems += check_archive(node, stored, sent - set(stored))
    received_dir = work / "received"
    received_dir.mkdir()
    received, retrieve_problems = retrieve_all(node, received_dir)
    problems += retrieve_problems
    problems += compare_retrieved(stored, received, flagged)
    print(f"checked in {time.monotonic() - started - elapsed:.1f} s")
    for problem in problems:
        print("PROBLEM", problem)
    return problems


# -- the tests --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases() -> list[Base]:
    return load_bases()


@pytest.fixture(scope="module")
def fuzz_cases(bases: list[Base], tmp_path_factory: pytest.TempPathFactory) -> list[FuzzCase]:
    directory = tmp_path_factory.mktemp("fuzz")
    return [build_case(i, bases, directory) for i in range(CASES)]


@pytest.fixture(scope="module")
def good_files(
    bases: list[Base], tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[Path, Meta]]:
    """Each base, unmutated, in a study of its own."""
    directory = tmp_path_factory.mktemp("good")
    files = []
    for number, base in enumerate(bases):
        uid = generate_uid(entropy_srcs=[str(SEED), "good", base.name])
        meta = Meta(base.sop_class_uid, uid, str(base.transfer_syntax))
        path = directory / f"good-{number:02d}-{base.name.replace('/', '_')}"
        path.write_bytes(meta.part10(base.with_uids(uid, new_study=True)))
        files.append((path, meta))
    return files


@pytest.fixture
def chunked_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are, its request from the meta."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.mark.usefixtures("chunked_sending")
def test_mutated_files_get_statuses_and_leave_a_consistent_archive(
    node: RunningNode,
    fuzz_cases: list[FuzzCase],
    good_files: list[tuple[Path, Meta]],
    tmp_path: Path,
) -> None:
    problems = fuzz_node(node, fuzz_cases, good_files, tmp_path)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)


@pytest.fixture
def compressing_settings(node_settings: Settings) -> Settings:
    node_settings.pipeline.compress = True
    node_settings.pipeline.poll_seconds = 0.1
    node_settings.node.processes = 1  # the one compression worker takes every instance
    return node_settings


@pytest.mark.usefixtures("chunked_sending")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the database is not the point
def test_mutated_files_with_background_compression(
    compressing_settings: Settings,
    node: RunningNode,
    fuzz_cases: list[FuzzCase],
    good_files: list[tuple[Path, Meta]],
    tmp_path: Path,
) -> None:
    """A subset, to a node compressing in the background: verify and C-GET then read
    compressed blobs."""
    small = [c for c in fuzz_cases if c.path.stat().st_size <= COMPRESSED_BASE_BYTES]
    cases = small[:COMPRESSED_CASES]
    good = [(p, m) for p, m in good_files if p.stat().st_size <= COMPRESSED_BASE_BYTES]
    stop = threading.Event()
    worker = start_compression(node.archive, stop, number=0)
    assert worker is not None

    def compressed() -> list[str]:
        deadline = time.monotonic() + 90
        while pending_ids(node.archive, 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = len(pending_ids(node.archive, 1000))
        return [f"compression: {left} instances still pending after 90 s"] if left else []

    try:
        problems = fuzz_node(node, cases, good, tmp_path, after_stores=compressed)
    finally:
        stop.set()
        worker.join(timeout=60)
    codecs = Counter(row.codec_id for row in index_rows(node))
    print(f"blobs by codec: {dict(codecs)}")
    assert codecs[IdentityCodec.codec_id] > 0, "no blob was compressed: verify read originals only"
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
