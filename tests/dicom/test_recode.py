"""JPEG Lossless and RLE originals stored as pixels: the original bytes regenerated exactly,
or the file kept whole."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as StudyRootGet
from sqlalchemy import select

from medzip_scp.codec.jpeg_lossless import parse
from medzip_scp.codec.jpegls_lossless import default_parameters
from medzip_scp.codec.rle_lossless import NotSplittable, join, split
from medzip_scp.dicom import blob as blob_module
from medzip_scp.dicom.blob import blob_info, decode_blob, encode_dataset
from medzip_scp.dicom.part10 import dataset_offset_of
from medzip_scp.index.models import Instance
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from tests.data_paths import SHARED_DATA
from tests.helpers.node import RunningNode
from tests.identity.node_traffic import get_data_sets, send_files

T1 = SHARED_DATA / "series" / "mr-t1-3d"


def _jpeg_lossless_files() -> list[Path]:
    files = sorted((SHARED_DATA / "conformance").glob("JPEGLossless*/*.dcm"))
    files += sorted(T1.iterdir())[40:42] if T1.is_dir() else []
    if not files:
        pytest.skip(f"no JPEG Lossless files under {SHARED_DATA} (see its README)")
    return files


def _kept_whole_size(part10: bytes) -> int:
    rest, frames = blob_module._rest_and_frames(part10, recode=False)
    return len(blob_module.compress(frames, rest))


@pytest.mark.slow  # 6-12 s on 2 cores: each JPEG Lossless file of ../shared/data, coded and decoded
def test_jpeg_lossless_originals_come_back_byte_for_byte_and_smaller() -> None:
    recoded = 0
    for path in _jpeg_lossless_files():
        data = path.read_bytes()
        blob = encode_dataset(data)
        assert decode_blob(blob) == data, path.name
        info = blob_info(blob)
        if info["mode"] == "recoded":
            recoded += 1
            assert len(blob) < _kept_whole_size(data), path.name
        else:  # colour, or noise the JPEG codes smaller: kept as it came
            assert info["mode"] == "encapsulated", path.name
    assert recoded >= 5


def _t1_file() -> bytes:
    if not T1.is_dir():
        pytest.skip(f"{T1} not found (see ../shared/data/README.md)")
    return sorted(T1.iterdir())[48].read_bytes()


def test_a_codestream_the_coder_does_not_reproduce_is_kept_whole() -> None:
    """Padding bits other than the 1-bits T.81 asks for: every decoder ignores them, the
    regenerated data would differ, so the file is kept as it came."""
    data = bytearray(_t1_file())
    ds = dcmread(BytesIO(bytes(data)))
    [pieces] = generate_fragmented_frames(ds.PixelData, number_of_frames=1)
    stream = b"".join(pieces)
    scan = parse(stream)
    last = stream[scan.ecs_end - 1]
    assert last != 0xFF and last & 1  # its lowest bit is a 1-bit of padding
    changed = stream[: scan.ecs_end - 1] + bytes([last & 0xFE]) + stream[scan.ecs_end :]
    assert np.array_equal(imagecodecs.ljpeg_decode(changed), imagecodecs.ljpeg_decode(stream))
    at = bytes(data).find(stream[scan.ecs_end - 8 : scan.ecs_end])
    assert at > 0
    data[at + 7] = last & 0xFE
    blob = encode_dataset(bytes(data))
    info = blob_info(blob)
    assert info["mode"] == "encapsulated"
    assert "not reproduced" in info["reason"]
    assert decode_blob(blob) == bytes(data)


def test_a_multi_frame_object_split_into_fragments_with_an_offset_table() -> None:
    """Two frames, each in two fragments, with a Basic Offset Table."""
    source = dcmread(BytesIO(_t1_file()))
    frames = [b"".join(p) for p in generate_fragmented_frames(source.PixelData, number_of_frames=1)]
    other = dcmread(BytesIO(sorted(T1.iterdir())[50].read_bytes()))
    frames += [b"".join(p) for p in generate_fragmented_frames(other.PixelData, number_of_frames=1)]
    source.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=True)
    source.NumberOfFrames = 2
    source.SOPInstanceUID = generate_uid()
    buffer = BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    blob = encode_dataset(data)
    assert blob_info(blob)["mode"] == "recoded" and blob_info(blob)["frames"] == 2
    assert decode_blob(blob) == data


def test_the_node_serves_a_recoded_original_in_its_syntax_and_decompressed(
    node: RunningNode,
) -> None:
    path = sorted(T1.iterdir())[48] if T1.is_dir() else None
    if path is None:
        pytest.skip(f"{T1} not found (see ../shared/data/README.md)")
    assert send_files(node, [path]) == {path: Status.SUCCESS}
    assert compress_pending(node.archive, node.archive.compressing_codec()).compressed == 1
    with node.archive.sessions() as session:
        row = session.scalars(select(Instance)).one()
        blob = node.archive.blobs.read(row.blob_key, bound_to=row.sop_instance_uid)
    assert blob_module.peek_blob(bytes(blob))  # parses; the mode is inside the sealed data
    raw = path.read_bytes()
    original = dcmread(path)
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = original.StudyInstanceUID
    query.SeriesInstanceUID = original.SeriesInstanceUID
    query.SOPInstanceUID = original.SOPInstanceUID
    for syntax in (JPEGLosslessSV1, ExplicitVRLittleEndian):
        contexts = {(str(original.SOPClassUID), str(syntax))}
        final, _, arrived = get_data_sets(node, query, contexts, StudyRootGet)
        assert final.Status == Status.SUCCESS, syntax
        [got] = arrived.values()
        if syntax == JPEGLosslessSV1:  # as received, byte for byte
            assert got == raw[dataset_offset_of(raw) :]
        else:  # the pixels, decompressed
            converted = dcmread(BytesIO(got), force=True)
            converted.file_meta = Dataset()
            converted.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            assert np.array_equal(converted.pixel_array, original.pixel_array)


def test_rle_originals_come_back_byte_for_byte_whatever_runs_their_encoder_chose() -> None:
    files = sorted((SHARED_DATA / "conformance" / "RLELossless").glob("*.dcm"))
    if not files:
        pytest.skip(f"no RLE Lossless files under {SHARED_DATA} (see its README)")
    recoded = 0
    for path in files:
        data = path.read_bytes()
        blob = encode_dataset(data)
        assert decode_blob(blob) == data, path.name
        if blob_info(blob)["mode"] == "recoded":
            recoded += 1
            assert len(blob) < _kept_whole_size(data), path.name
    assert recoded >= 3  # the MR and ultrasound ones; tiny synthetic images stay whole


def test_an_rle_frame_splits_into_its_skeleton_and_planes() -> None:
    planes = [bytes([1, 1, 1, 2, 3]), bytes([9, 8, 7, 7, 7])]
    # plane 0: a replicate run of 3, a literal run of 2, a no-op; plane 1: literal 2,
    # replicate 3, then one byte of padding
    seg0 = bytes([256 - 2, 1, 1, 2, 3, 128])
    seg1 = bytes([1, 9, 8, 256 - 2, 7, 0])
    header = struct.pack("<16I", 2, 64, 64 + len(seg0), *[0] * 13)
    frame = header + seg0 + seg1
    skeleton, found = split(frame, 2, 5)
    assert found == planes
    assert join(skeleton, planes) == frame
    assert len(skeleton) < len(frame)  # the run data is in the planes, not in the skeleton
    with pytest.raises(NotSplittable, match="segments"):
        split(frame, 3, 5)
    with pytest.raises(NotSplittable, match="before its plane is complete"):
        split(frame, 2, 9)


def test_attributes_declaring_more_pixels_than_the_data_can_hold_are_never_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decompression bomb (a tiny JPEG that claims 60000 x 60000 pixels) is kept whole,
    never decoded: the background worker's memory stays bounded."""
    source = dcmread(BytesIO(_t1_file()))
    source.Rows = source.Columns = 60000
    buffer = BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    decoded: list[bytes] = []
    monkeypatch.setattr(imagecodecs, "ljpeg_decode", lambda data: decoded.append(data))
    blob = encode_dataset(buffer.getvalue())
    assert decoded == []
    assert "declare more pixels than its data can hold" in blob_info(blob)["reason"]
    assert decode_blob(blob) == buffer.getvalue()


def _jpegls_lossless_files() -> list[Path]:
    files = sorted((SHARED_DATA / "conformance").glob("JPEGLSLossless/*.dcm"))
    if not files:
        pytest.skip(f"no JPEG-LS lossless files under {SHARED_DATA} (see its README)")
    return files


def test_jpegls_lossless_originals_come_back_byte_for_byte_and_smaller() -> None:
    """Single-frame, multi-frame and 10-bit JPEG-LS (with and without a preset-parameters
    segment): the scans come back from the pixels; the files are stored smaller."""
    for path in _jpegls_lossless_files():
        data = path.read_bytes()
        blob = encode_dataset(data)
        assert blob_info(blob)["mode"] == "recoded", path.name
        assert len(blob) < _kept_whole_size(data), path.name
        assert decode_blob(blob) == data, path.name


def test_jpegls_scans_with_other_parameters_are_kept_whole() -> None:
    """Thresholds other than the standard's defaults (an encoder told to use them) would
    not come back from CharLS at its defaults: such a file is kept as it came."""
    path = next(p for p in _jpegls_lossless_files() if "RG2" in p.name)
    data = bytearray(path.read_bytes())
    preset = bytes.fromhex("fff8000d0103ff0006001300480040")  # the defaults
    at = bytes(data).find(preset)
    assert at > 0
    data[at + 7 : at + 9] = struct.pack(">H", 7)  # T1 6 -> 7
    blob = encode_dataset(bytes(data))
    info = blob_info(blob)
    assert info["mode"] == "encapsulated"
    assert "preset coding parameters other than the defaults" in info["reason"]
    assert decode_blob(blob) == bytes(data)


@pytest.mark.parametrize(
    ("precision", "expected"),
    [(8, (255, 3, 7, 21, 64)), (10, (1023, 6, 19, 72, 64)), (16, (65535, 18, 67, 276, 64))],
)
def test_jpegls_default_parameters_are_the_standards(precision: int, expected: tuple) -> None:
    """ISO/IEC 14495-1 C.2.4.1.1: 8 bits gives the basic thresholds 3, 7, 21; the 10- and
    16-bit values are those in the conformance files' own preset segments."""
    assert default_parameters(precision) == expected
