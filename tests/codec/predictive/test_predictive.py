"""Round-trip, robustness and determinism tests of the predictive per-frame coder."""

from __future__ import annotations

import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from medzip_scp.codec.predictive import (
    CODER_ID,
    CorruptStreamError,
    Fit,
    FlushSlot,
    decode_frame,
    decode_frame_slot,
    encode_frame,
    encode_frame_fit,
    encode_frame_slot,
    warm_start,
)

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def roundtrip(frame: np.ndarray, bits: int) -> bytes:
    stream = encode_frame(frame, bits)
    out = decode_frame(stream, frame.shape, bits)
    assert out.dtype == np.uint16
    assert out.shape == frame.shape
    np.testing.assert_array_equal(out, frame.astype(np.uint16))
    return stream


def test_coder_id() -> None:
    assert CODER_ID == "pred-v2"


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_bit_depth(bits: int) -> None:
    rng = np.random.default_rng(bits)
    top = (1 << bits) - 1
    yy, xx = np.mgrid[0:37, 0:53]
    smooth = ((yy * 7 + xx * 3) * top // (36 * 7 + 52 * 3)).astype(np.int64)
    noisy = np.clip(smooth + rng.integers(-2, 3, smooth.shape), 0, top)
    roundtrip(noisy, bits)
    roundtrip(rng.integers(0, top + 1, (19, 23)), bits)  # full-range noise
    ext = np.where(rng.random((16, 16)) < 0.5, 0, top)  # only the extremes
    roundtrip(ext, bits)


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 17), (17, 1), (3, 3), (2, 2), (1, 2), (2, 1), (4, 300), (300, 4)]
)
def test_small_shapes(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for bits in (1, 8, 12, 16):
        roundtrip(rng.integers(0, 1 << bits, shape), bits)


@pytest.mark.parametrize("value", [0, 1, 4095])
def test_constant(value: int) -> None:
    frame = np.full((64, 48), value, np.uint16)
    stream = roundtrip(frame, 12)
    assert len(stream) < 40


def test_gradients_and_extremes() -> None:
    yy, xx = np.mgrid[0:128, 0:128]
    roundtrip((xx * 512 + yy).astype(np.uint16), 16)
    roundtrip(((xx + yy) % 65536).astype(np.uint16), 16)
    roundtrip(np.full((9, 9), 65535), 16)
    frame = np.zeros((64, 64), np.uint16)
    frame[::2, ::3] = 65535
    roundtrip(frame, 16)
    roundtrip(np.triu(np.full((50, 50), 255)), 8)


def test_sparse_values_are_packed() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:200, 0:200]
    base = (yy + xx) // 4 + rng.integers(0, 2, (200, 200))
    frame = (base * 13 + 7).astype(np.uint16)  # a LUT-like, sparse use of 12 bits
    stream = roundtrip(frame, 12)
    assert len(stream) * 8 / frame.size < 2.0


def test_noise_costs_about_its_entropy() -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 4096, (256, 256))
    stream = roundtrip(frame, 12)
    assert len(stream) * 8 / frame.size < 12.2


def test_accepts_integer_dtypes() -> None:
    frame = np.arange(100, dtype=np.int32).reshape(10, 10)
    for dt in (np.uint8, np.int16, np.int64, np.uint32):
        out = decode_frame(encode_frame(frame.astype(dt), 7), (10, 10), 7)
        np.testing.assert_array_equal(out, frame)


@pytest.mark.parametrize(
    "frame, bits",
    [
        (np.zeros((4, 4), np.float32), 8),
        (np.zeros(16, np.uint16), 8),
        (np.zeros((2, 2, 2), np.uint16), 8),
        (np.zeros((0, 4), np.uint16), 8),
        (np.full((4, 4), 256, np.uint16), 8),
        (np.full((4, 4), -1, np.int16), 8),
        (np.zeros((4, 4), np.uint16), 0),
        (np.zeros((4, 4), np.uint16), 17),
    ],
)
def test_bad_input_raises(frame: np.ndarray, bits: int) -> None:
    with pytest.raises(ValueError):
        encode_frame(frame, bits)


def _sample_stream() -> tuple[np.ndarray, bytes]:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:96, 0:80]
    frame = np.clip(yy * 20 + xx * 10 + rng.normal(0, 30, yy.shape), 0, 4095).astype(np.uint16)
    return frame, encode_frame(frame, 12)


def test_truncated_streams_raise() -> None:
    frame, stream = _sample_stream()
    for n in (
        list(range(0, 64))
        + list(range(64, len(stream), max(1, len(stream) // 97)))
        + [len(stream) - 1]
    ):
        with pytest.raises(CorruptStreamError):
            decode_frame(stream[:n], frame.shape, 12)


def test_corrupted_streams_raise() -> None:
    frame, stream = _sample_stream()
    rng = np.random.default_rng(11)
    for pos in rng.choice(len(stream), 200, replace=False):
        for flip in (1, 0x80):
            bad = bytearray(stream)
            bad[pos] ^= flip
            try:
                out = decode_frame(bytes(bad), frame.shape, 12)
            except ValueError:
                continue
            # a flip the arithmetic decoder absorbs must still give the exact frame
            np.testing.assert_array_equal(out, frame)
    with pytest.raises(CorruptStreamError):
        decode_frame(stream + b"\0", frame.shape, 12)


def test_wrong_shape_or_bits_raise() -> None:
    frame, stream = _sample_stream()
    with pytest.raises(CorruptStreamError):
        decode_frame(stream, (80, 96), 12)
    with pytest.raises(CorruptStreamError):
        decode_frame(stream, frame.shape, 16)
    with pytest.raises(CorruptStreamError):
        decode_frame(b"JUNK" + stream[4:], frame.shape, 12)


def test_crc_covers_pixels() -> None:
    frame, stream = _sample_stream()
    crc = int.from_bytes(stream[-4:], "little")
    assert crc == zlib.crc32(frame.astype("<u2").tobytes())


def test_deterministic() -> None:
    frame, stream = _sample_stream()
    assert encode_frame(frame, 12) == stream
    assert encode_frame(frame.copy(order="F"), 12) == stream


GOLDEN_SCRIPT = """
import hashlib, numpy as np
from medzip_scp.codec.predictive import encode_frame
rng = np.random.default_rng(5)
yy, xx = np.mgrid[0:300, 0:700]
f = np.clip(yy * 5 + xx * 3 + rng.normal(0, 20, yy.shape), 0, 4095).astype(np.uint16)
print(hashlib.sha256(encode_frame(f, 12)).hexdigest())
"""


def test_same_bytes_with_one_or_two_threads() -> None:
    # the core, the fit included, is single-threaded: BLAS thread counts must not reach the
    # stream
    digests = set()
    for threads in ("1", "2"):
        env = {
            "OMP_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "PATH": "/usr/bin:/bin",
        }
        out = subprocess.run(
            [sys.executable, "-c", GOLDEN_SCRIPT],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[3],
            check=True,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def _real_frames() -> list[tuple[str, np.ndarray, int]]:
    if not DATA.is_dir():
        return []
    pydicom = pytest.importorskip("pydicom")
    picks = [
        "series/ct-phantom-1mm/I400.dcm",
        "series/mr-t1-3d/5001050.dcm",
        "conformance/JPEGLSLossless/RG2_JLSL.dcm",
        "conformance/LittleEndianExplicit/MR_small.dcm",
        "conformance/LittleEndianExplicit/CT_small.dcm",
    ]
    frames = []
    for rel in picks:
        path = DATA / rel
        if not path.exists():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array.astype(np.int64)
        bits = int(ds.BitsStored)
        if int(ds.PixelRepresentation) == 1:
            arr = arr + (1 << (bits - 1))
        if arr.ndim == 3:
            arr = arr[0]
        frames.append((rel, arr[:768, :768], bits))
    return frames


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")
def test_real_frames() -> None:
    frames = _real_frames()
    assert frames
    for rel, arr, bits in frames:
        stream = roundtrip(arr, bits)
        assert len(stream) * 8 / arr.size < bits, rel


# Streams written by pred-v1 (format version 1); they must decode forever.
GOLDEN_V1 = (
    "TVpQRgEMGAAAABQAAAACDABhBbYAAAB42gGrAFT/gAAAAJIAEAEBCAAICIBBEAAAjiAAQ0IAAKHAQkCAxsaCAKIJFEAoVBEvsgoCBPjAWYApRlMTaVyUQ4ATKC3VIq6MZYgKcKaHCixZVDQapFDMxDVkQntSBcKSE6JRxNtJAAszCVlWwOiiqlldZIm0CDR8RKTVEEFxESSq2YGgAkhRkOmig0RGAGAREVAJhEkFgAQQRgBUAGEIACEBEgGBAgCQAACQIAAAQAAMm3c0HgkEAQgWAAAAeNqbwsDAoAXEa////z8DSAMAJP4FAS8BAACAf7qvNnyUf+tE8Yh29sbqDToWSrTId8A5ryqmaZW1gwc3KoY2vZ+KA9//VggGhmMTATQky3A8HFeYQrTCBuZ6sLJkkipszkqJX3kXDcqsJVA3BN7UoX2Qo/aTzcZcTc8o1UaeAdBE9W6qoJs+CG7eea7U7ifXs80MQOpkbaaKOM1vYQKyMZxI+OfAxjyhT9wvnPPwrgWbeISjWHK7GzyVNpBQ8OQwikC1YpZYAvU+w+nsZR66mkuZn+r1uGo22BtOvIBDo5Fv5MjkEYVWq2fxIuQme9EbDSROnsrsBW5knuLyVRdTaZPuehwCv4iJb7r152krYdpVtxbWwTxENg4O8g9B6c97LtMUejsD0Xx3AFLVfsGz6TOAVCDCfj0vyQbBzKN9P3C2IuAH0Fm6FYF3/LSL",
    "TVpQRgEMHgAAAB4AAAACAACQABMAAAB42mtwUBDgYGFiZGiAMwAbiAJ/BQQBCBMAAAB42nvMwMDACMSqQMwKxAAPiAEPlgAAAIe//lpQqM3eqMaOWso2C/5121kBPWmR4bC9Ym7Es5b8LSuTSumV/2TSyNEXwU2j0mvUKYuOSCUYE8q5Z47pPlN7OIPTXrCLJXlrw0ezNCjoBZ4TYNCKmw7dHemZYcIucXPIReY+SHFfDWAf+T2bhY6xz0RL/dBQbqtHb+6wctoxeCykQKlZIWtGp0SY9JiF/8gnjgxhnArBpLk=",
)


def _golden_frames() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2024)
    yy, xx = np.mgrid[0:24, 0:20]
    f = np.clip(yy * 40 + xx * 25 + rng.normal(0, 12, yy.shape), 0, 4095).astype(np.uint16)
    g = (np.arange(30 * 30).reshape(30, 30) % 17 * 9).astype(np.uint16)
    return f, g


def test_version_1_streams_still_decode() -> None:
    import base64

    f, g = _golden_frames()
    for b64, frame in zip(GOLDEN_V1, (f, g), strict=True):
        stream = base64.b64decode(b64)
        assert stream[4] == 1
        np.testing.assert_array_equal(decode_frame(stream, frame.shape, 12), frame)


# sha256 of the pred-v2 stream of the first golden frame: a change here is a format change,
# which needs a new version number (and the old one kept decodable), never an edit of this pin.
GOLDEN_V2_SHA256 = {  # the golden frame in mode 1 (direct) and mode 2 (packed)
    1: "0c710c8a7006fdab3d10845e7edc86c5d512a8e79ace9130ea33a8843dab15d5",
    2: "ee150edbd6370610e9897c47a4b855a9b1a626602923217cd1efee95875ffce9",
}


def test_version_2_bitstream_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import medzip_scp.codec.predictive as predictive

    f, _ = _golden_frames()
    stream = encode_frame(f, 12)
    # 24x20 pixels over 1,400 levels use a fifth of them by sampling alone: values code
    # smaller than ranks (444 against 540 bytes), so the small frame is coded direct
    assert stream[14] == 1
    assert hashlib.sha256(stream).hexdigest() == GOLDEN_V2_SHA256[1]
    monkeypatch.setattr(predictive, "_TRY_BOTH_PIXELS", 0)  # a larger frame: packed
    packed = encode_frame(f, 12)
    assert packed[14] == 2 and len(packed) > len(stream)
    assert hashlib.sha256(packed).hexdigest() == GOLDEN_V2_SHA256[2]


# -- free bits in the arithmetic coder's flush ------------------------------------------------


def _with_flush(stream: bytes, slot: FlushSlot, value: int) -> bytes:
    return stream[: slot.offset] + value.to_bytes(4, "big") + stream[slot.offset + 4 :]


def _packed_frame() -> np.ndarray:
    return ((np.arange(40 * 30).reshape(40, 30) % 23) * 150).astype(np.uint16)  # mode 2


@pytest.mark.parametrize("mode", [1, 2])
def test_encoder_and_decoder_agree_on_the_flush(mode: int) -> None:
    frame = _sample_stream()[0] if mode == 1 else _packed_frame()
    stream, slot = encode_frame_slot(frame, 12)
    assert stream[14] == mode
    assert stream == encode_frame(frame, 12)  # reporting the slot changes no byte
    assert slot is not None
    # the flush is the last 4 arithmetic-coded bytes (then the CRC), holding x1
    assert slot.offset == len(stream) - 8
    assert slot.value == slot.low == int.from_bytes(stream[-8:-4], "big")
    assert slot.carried == 0
    assert 1 <= slot.capacity <= 32
    assert slot.high - slot.low + 1 >= 1 << slot.capacity
    assert slot.high - slot.low + 1 < 2 << slot.capacity
    out, read = decode_frame_slot(stream, frame.shape, 12)
    np.testing.assert_array_equal(out, frame)
    assert read == slot


def test_any_value_in_the_final_interval_decodes_the_same() -> None:
    frame, stream = _sample_stream()
    _, slot = encode_frame_slot(frame, 12)
    assert slot is not None
    rng = np.random.default_rng(3)
    cap = slot.capacity
    for carried in [0, 1, (1 << cap) - 1, *rng.integers(0, 1 << cap, 50).tolist()]:
        carrying = _with_flush(stream, slot, slot.low + carried)
        assert carrying[: slot.offset] == stream[: slot.offset]
        assert slot.flush_bytes(carried) == carrying[slot.offset : slot.offset + 4]
        out, read = decode_frame_slot(carrying, frame.shape, 12)
        np.testing.assert_array_equal(out, frame)
        assert read is not None
        assert (read.low, read.high, read.carried) == (slot.low, slot.high, carried)
    # the interval's top end as well, though it may lie above the capacity
    np.testing.assert_array_equal(
        decode_frame_slot(_with_flush(stream, slot, slot.high), frame.shape, 12)[0], frame
    )
    with pytest.raises(ValueError, match="carried value"):
        slot.flush_bytes(1 << cap)
    with pytest.raises(ValueError, match="carried value"):
        slot.flush_bytes(-1)


def test_a_flush_outside_the_final_interval_is_corrupt() -> None:
    frame, stream = _sample_stream()
    _, slot = encode_frame_slot(frame, 12)
    assert slot is not None
    outside = [v for v in (slot.low - 1, slot.high + 1) if 0 <= v < 1 << 32]
    assert outside
    for value in outside:
        with pytest.raises(CorruptStreamError):
            decode_frame_slot(_with_flush(stream, slot, value), frame.shape, 12)


@pytest.mark.parametrize(
    "frame", [np.full((8, 8), 9, np.uint16), np.random.default_rng(1).integers(0, 4096, (8, 8))]
)
def test_constant_and_raw_streams_have_no_flush(frame: np.ndarray) -> None:
    stream, slot = encode_frame_slot(frame, 12)
    assert stream[14] in (0, 3)  # mode constant or raw: no arithmetic coder
    assert slot is None
    out, read = decode_frame_slot(stream, frame.shape, 12)
    np.testing.assert_array_equal(out, frame)
    assert read is None


def test_version_1_streams_report_their_flush() -> None:
    import base64

    f, _ = _golden_frames()
    stream = base64.b64decode(GOLDEN_V1[0])
    out, slot = decode_frame_slot(stream, f.shape, 12)
    np.testing.assert_array_equal(out, f)
    assert slot is not None and slot.carried == 0 and slot.offset == len(stream) - 8


# -- warm start: a similar frame's fit as the starting point of the encoder's fit ------------


def _similar_frames(n: int = 3) -> list[np.ndarray]:
    """Frames of one smooth scene with fresh noise each: 200x200 (several activity classes)."""
    rng = np.random.default_rng(21)
    yy, xx = np.mgrid[0:200, 0:200]
    scene = 1500 + 800 * np.sin(yy / 23.0) * np.cos(xx / 31.0) + 3 * yy
    scene[60:140, 70:130] += 900  # an edge, so the classes differ
    return [
        np.clip(scene + rng.normal(0, 12, scene.shape), 0, 4095).astype(np.uint16) for _ in range(n)
    ]


def test_warm_start_hint_changes_only_the_fit() -> None:
    f0, f1, _ = _similar_frames()
    _, fit0 = encode_frame_fit(f0, 12)
    assert isinstance(fit0, Fit) and fit0.coefficients.shape[1] == 12
    cold = encode_frame(f1, 12)
    warm = encode_frame(f1, 12, hint=fit0)
    assert warm != cold  # the hint steered the fit
    # the stream stands alone: it decodes without the hint, with its flush slot
    np.testing.assert_array_equal(decode_frame(warm, f1.shape, 12), f1)
    out, slot = decode_frame_slot(warm, f1.shape, 12)
    np.testing.assert_array_equal(out, f1)
    assert slot == encode_frame_slot(f1, 12, hint=fit0)[1]
    assert abs(len(warm) - len(cold)) < 0.005 * len(cold)
    assert encode_frame(f1, 12, hint=fit0) == warm  # deterministic


def test_warm_start_context_chains_each_frame_to_the_last() -> None:
    frames = _similar_frames()
    fits: list[Fit | None] = [None]
    for f in frames[:-1]:
        fits.append(encode_frame_fit(f, 12, fits[-1])[1])
    chained = [encode_frame(f, 12, hint=h) for f, h in zip(frames, fits, strict=True)]
    with warm_start():
        in_context = [encode_frame(f, 12) for f in frames]
    assert in_context == chained
    assert in_context[1:] != [encode_frame(f, 12) for f in frames[1:]]
    # outside the block no chain is kept
    assert encode_frame(frames[1], 12) == encode_frame(frames[1], 12, hint=None)
    for f, stream in zip(frames, in_context, strict=True):
        np.testing.assert_array_equal(decode_frame(stream, f.shape, 12), f)


def test_a_hint_that_does_not_fit_the_frame_is_ignored() -> None:
    f0, f1, _ = _similar_frames()
    small = np.ascontiguousarray(f0[:60, :60])  # 3,600 pixels: 4 taps, 1 class
    _, small_fit = encode_frame_fit(small, 12)
    assert small_fit is not None and small_fit.coefficients.shape == (1, 4)
    assert encode_frame(f1, 12, hint=small_fit) == encode_frame(f1, 12)
    _, big_fit = encode_frame_fit(f1, 12)
    assert encode_frame(small, 12, hint=big_fit) == encode_frame(small, 12)
    assert encode_frame_fit(np.full((8, 8), 7), 12)[1] is None  # constant: nothing fitted
