"""Round trips of the pixel codec on synthetic edge cases."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from medzip_scp.codec.api import (
    DEFAULT_PATHS,
    FrameSet,
    PixelLayout,
    compress,
    decompress,
    describe,
)
from medzip_scp.codec.container import SectionType, get_varint, read_container
from medzip_scp.codec.errors import CodecError
from medzip_scp.codec.gate import extra_candidates
from medzip_scp.codec.paths import get_encoder, get_path, register_path, values_dtype


def _smooth(rows: int, cols: int, lo: int, hi: int, seed: int = 0) -> npt.NDArray[np.int64]:
    """A smooth image with noise spanning [lo, hi] (inclusive)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:rows, :cols]
    base = np.sin(x / 7.0) + np.cos(y / 5.0) + rng.normal(0, 0.2, (rows, cols))
    base = (base - base.min()) / max(float(np.ptp(base)), 1e-9)
    img = np.rint(lo + base * (hi - lo)).astype(np.int64)
    img.flat[0], img.flat[-1] = lo, hi
    return img


def _roundtrip(layout: PixelLayout, pixels: npt.NDArray[np.generic]) -> bytes:
    frames = FrameSet(layout, pixels)
    blob = compress(frames, b"rest")
    out = decompress(blob)
    assert out.frames is not None
    assert out.frames.layout == layout
    assert out.frames.pixels.dtype == pixels.dtype
    np.testing.assert_array_equal(out.frames.pixels, pixels)
    assert out.dataset_rest == b"rest"
    return blob


@pytest.mark.parametrize("bits_stored", range(1, 17))
def test_every_bits_stored_unsigned_16(bits_stored: int) -> None:
    img = _smooth(37, 41, 0, (1 << bits_stored) - 1, seed=bits_stored)
    px = img.astype(np.uint16)[None, ..., None]
    blob = _roundtrip(PixelLayout(37, 41, 1, 16, bits_stored, False), px)
    info = describe(blob)
    assert info["frames"][0]["value_bits"] == bits_stored
    assert info["frames"][0]["residual_bytes"] == 0


@pytest.mark.parametrize("bits_stored", range(2, 17))
def test_every_bits_stored_signed_extremes(bits_stored: int) -> None:
    lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    img = _smooth(16, 24, lo, hi, seed=bits_stored)
    img[0, :3] = [lo, hi, -1]
    px = img.astype(np.int16)[None, ..., None]
    blob = _roundtrip(PixelLayout(16, 24, 1, 16, bits_stored, True), px)
    # clean sign extension is not a residual
    assert describe(blob)["frames"][0]["residual_bytes"] == 0


@pytest.mark.parametrize(
    ("dtype", "ba", "signed", "value"),
    [
        (np.uint16, 16, False, 0),
        (np.uint16, 16, False, 65535),
        (np.int16, 16, True, -32768),
        (np.uint8, 8, False, 255),
        (np.int32, 32, True, -(2**31)),
        (np.uint32, 32, False, 2**32 - 1),
    ],
)
def test_constant_images(dtype: type, ba: int, signed: bool, value: int) -> None:
    px = np.full((2, 20, 30, 1), value, dtype=dtype)
    blob = _roundtrip(PixelLayout(20, 30, 1, ba, ba, signed), px)
    assert describe(blob)["frames"][0]["path"] == "constant"


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (1, 17), (17, 1), (5, 7)])
def test_tiny_and_odd_sizes(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    px = rng.integers(0, 4096, (1, *shape, 1)).astype(np.uint16)
    _roundtrip(PixelLayout(*shape, 1, 16, 12, False), px)


def test_random_noise_full_16_bits() -> None:
    rng = np.random.default_rng(4)
    px = rng.integers(0, 65536, (1, 64, 64, 1)).astype(np.uint16)
    blob = _roundtrip(PixelLayout(64, 64, 1, 16, 16, False), px)
    # incompressible: the container must not blow up (verbatim is always available)
    assert len(blob) < px.nbytes + 512


@pytest.mark.parametrize("signed", [False, True])
def test_unused_high_bits_are_preserved(signed: bool) -> None:
    rng = np.random.default_rng(5)
    img = _smooth(48, 48, -2048 if signed else 0, 2047 if signed else 4095)
    words = img.astype(np.int16 if signed else np.uint16).view(np.uint16)
    words = words & np.uint16(0x0FFF)  # 12 stored bits, high nibble clear
    overlay = rng.random((48, 48)) < 0.1
    words[overlay] |= np.uint16(0x8000)  # an overlay bit in bit 15
    words[0, 0] |= np.uint16(0x7000)  # garbage
    px = words.view(np.int16 if signed else np.uint16)[None, ..., None]
    blob = _roundtrip(PixelLayout(48, 48, 1, 16, 12, signed), px)
    frame = describe(blob)["frames"][0]
    assert frame["residual_bytes"] > 0 or frame["value_bits"] == 16


def test_values_beyond_bits_stored_fall_back_to_whole_word() -> None:
    # labelled 12 bits but really 16: coding the whole word must win over a big residual
    img = _smooth(64, 64, 0, 65535).astype(np.uint16)[None, ..., None]
    blob = _roundtrip(PixelLayout(64, 64, 1, 16, 12, False), img)
    assert describe(blob)["frames"][0]["value_bits"] == 16


@pytest.mark.parametrize("planar", [0, 1])
@pytest.mark.parametrize("ba", [8, 16])
def test_rgb(planar: int, ba: int) -> None:
    hi = (1 << ba) - 1
    px = np.stack([_smooth(30, 20, 0, hi, seed=s) for s in range(3)], axis=-1)
    px = px.astype(np.uint8 if ba == 8 else np.uint16)[None]
    _roundtrip(PixelLayout(30, 20, 3, ba, ba, False, planar), px)


def test_multiframe_each_frame_own_path() -> None:
    rng = np.random.default_rng(6)
    frames = [
        _smooth(32, 32, 0, 4095),
        np.full((32, 32), 7),
        rng.integers(0, 4096, (32, 32)),
        _smooth(32, 32, 100, 200, seed=9),
    ]
    px = np.stack(frames).astype(np.uint16)[..., None]
    blob = _roundtrip(PixelLayout(32, 32, 1, 16, 12, False), px)
    paths = [f["path"] for f in describe(blob)["frames"]]
    assert len(paths) == 4
    assert paths[1] == "constant"


def test_one_bit() -> None:
    rng = np.random.default_rng(7)
    px = (rng.random((3, 13, 11, 1)) < 0.3).astype(np.uint8)
    _roundtrip(PixelLayout(13, 11, 1, 1, 1, False), px)


@pytest.mark.parametrize("signed", [False, True])
def test_thirty_two_bit(signed: bool) -> None:
    rng = np.random.default_rng(8)
    if signed:
        px = rng.integers(-(2**31), 2**31, (2, 10, 10, 3)).astype(np.int32)
    else:
        px = rng.integers(0, 2**32, (2, 10, 10, 3), dtype=np.uint64).astype(np.uint32)
    _roundtrip(PixelLayout(10, 10, 3, 32, 32, signed), px)
    # small values in a 32-bit container still reach the image codecs
    small = _smooth(40, 40, 1000, 5000).astype(np.uint32)[None, ..., None]
    blob = _roundtrip(PixelLayout(40, 40, 1, 32, 32, False), small)
    assert describe(blob)["frames"][0]["nbits"] <= 13


def test_signed_eight_bit() -> None:
    px = _smooth(20, 20, -128, 127).astype(np.int8)[None, ..., None]
    _roundtrip(PixelLayout(20, 20, 1, 8, 8, True), px)


def test_chosen_path_is_smallest_candidate() -> None:
    img = _smooth(64, 64, 0, 4095, seed=11)
    px = img.astype(np.uint16)[None, ..., None]
    blob = compress(FrameSet(PixelLayout(64, 64, 1, 16, 12, False), px))
    chosen = describe(blob)["frames"][0]
    values = img.astype(values_dtype(12))[..., None]
    for name in (*DEFAULT_PATHS, *extra_candidates(values, 12)):
        data = get_encoder(name).encode(values, 12)  # type: ignore[union-attr]
        assert data is not None
        assert chosen["bytes"] <= len(data), name


class _LyingPath:
    """A path whose tiny output does not decode to the input: must never be chosen."""

    name = "test-lying"

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        return b"x"

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        return np.zeros(shape, values_dtype(nbits))


def test_unverified_path_is_never_chosen() -> None:
    if get_path("test-lying") is None:
        register_path(_LyingPath())
    px = _smooth(16, 16, 0, 255).astype(np.uint8)[None, ..., None]
    blob = compress(FrameSet(PixelLayout(16, 16, 1, 8, 8, False), px), paths=("test-lying", "zstd"))
    assert describe(blob)["frames"][0]["path"] != "test-lying"
    np.testing.assert_array_equal(decompress(blob).frames.pixels, px)  # type: ignore[union-attr]


def test_deterministic() -> None:
    px = _smooth(50, 60, 0, 1023).astype(np.uint16)[None, ..., None]
    fs = FrameSet(PixelLayout(50, 60, 1, 16, 10, False), px)
    assert compress(fs, b"x") == compress(fs, b"x")


def test_no_frames_and_payload() -> None:
    blob = compress(None, b"only bytes" * 100, payload=b"\x01secret-ciphertext")
    out = decompress(blob)
    assert out.frames is None
    assert out.dataset_rest == b"only bytes" * 100
    assert out.payload == b"\x01secret-ciphertext"
    assert describe(blob)["payload_bytes"] == len(b"\x01secret-ciphertext")


@pytest.mark.parametrize(
    ("layout", "pixels", "match"),
    [
        (PixelLayout(4, 4, 1, 16, 12), np.zeros((1, 4, 4, 1), np.int16), "dtype"),
        (PixelLayout(4, 4, 1, 16, 12), np.zeros((1, 4, 5, 1), np.uint16), "shape"),
        (PixelLayout(4, 4, 1, 16, 17), np.zeros((1, 4, 4, 1), np.uint16), "bits stored"),
        (PixelLayout(4, 4, 1, 12, 12), np.zeros((1, 4, 4, 1), np.uint16), "Bits Allocated"),
        (PixelLayout(4, 4, 1, 1, 1), np.full((1, 4, 4, 1), 2, np.uint8), "0 and 1"),
    ],
)
def test_invalid_frame_sets_are_rejected(
    layout: PixelLayout, pixels: npt.NDArray[np.generic], match: str
) -> None:
    with pytest.raises(CodecError, match=match):
        FrameSet(layout, pixels)


def test_unknown_path_name_is_rejected() -> None:
    px = np.zeros((1, 2, 2, 1), np.uint8)
    with pytest.raises(CodecError, match="not registered"):
        compress(FrameSet(PixelLayout(2, 2, 1, 8, 8), px), paths=("no-such-path",))


def _check_payload_round_trip(frames: FrameSet, payload: bytes, **kw: object) -> bytes:
    blob = compress(frames, b"rest", payload=payload, learned=None, **kw)  # type: ignore[arg-type]
    out = decompress(blob)
    assert out.payload == payload
    assert out.dataset_rest == b"rest"
    assert out.frames is not None
    np.testing.assert_array_equal(out.frames.pixels, frames.pixels)
    info = describe(blob)
    assert (info["payload_mode"], info["payload_bytes"]) == (3 if payload else 0, len(payload))
    plain = describe(compress(frames, b"rest", learned=None, **kw))  # type: ignore[arg-type]
    assert info["frames"] == plain["frames"]  # per-frame byte counts leave the payload out
    return blob


def _random_payload(length: int) -> bytes:
    return np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("frames", ["carrier_frames", "free_bits_frames"])
@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 600, 5000])
def test_spread_payload_round_trip(
    request: pytest.FixtureRequest, frames: str, length: int
) -> None:
    """Payloads of 0, 1, n - 1, n and n + 1 bytes over n = 4 frames, one more than the
    frames can carry; the frames are noise, noise with a residual, tiny and constant (no
    free bits), or three frames coded by the arithmetic coder among others (free bits)."""
    _check_payload_round_trip(request.getfixturevalue(frames), _random_payload(length))


def _free_bytes(blob: bytes) -> int:
    body = next(s.data for s in read_container(blob)[1] if s.type == SectionType.PAYLOAD)
    return get_varint(body, 1)[0]


def test_free_bits_round_trip_at_every_length_near_their_capacity(
    free_bits_frames: FrameSet,
) -> None:
    capacity = _free_bytes(compress(free_bits_frames, payload=bytes(100), learned=None))
    assert capacity >= 6
    for length in range(1, capacity + 8):
        blob = _check_payload_round_trip(free_bits_frames, _random_payload(length))
        assert _free_bytes(blob) == min(length, capacity)
    for payload in (bytes(capacity), b"\xff" * capacity):  # every free bit 0, every bit 1
        _check_payload_round_trip(free_bits_frames, payload)


def test_free_bits_ride_in_every_sample_stream() -> None:
    """A 3-sample frame coded by ``pred`` has three coder flushes, carried in sample order."""
    rng = np.random.default_rng(4)
    y, x = np.mgrid[:40, :36]
    planes = [(y * (2 + i) + x * (3 - i) + rng.integers(0, 6, y.shape)) % 256 for i in range(3)]
    rgb = np.stack(planes, -1).astype(np.uint8)[None]
    frames = FrameSet(PixelLayout(40, 36, 3, 8, 8, False), np.concatenate([rgb, rgb[:, ::-1]]))
    plain = compress(frames, paths=("pred",), learned=None)
    assert [f["path"] for f in describe(plain)["frames"]] == ["pred", "pred"]
    capacity = _free_bytes(compress(frames, payload=bytes(100), paths=("pred",), learned=None))
    assert capacity > 8  # more than two flushes hold
    for length in (1, 4, capacity - 1, capacity, capacity + 1, 300):
        _check_payload_round_trip(frames, _random_payload(length), paths=("pred",))


@pytest.mark.parametrize("length", [1, 100, 600, 1000, 5000, 16383])
def test_spread_payload_costs_its_length_and_a_few_bytes(
    carrier_frames: FrameSet, length: int
) -> None:
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    plain = compress(carrier_frames, learned=None)
    overhead = len(compress(carrier_frames, payload=payload, learned=None)) - len(plain) - length
    # the PAYLOAD section's entry (type, length, CRC-32), its mode byte and two lengths (no
    # free bits: the frames' pred streams are raw)
    assert 8 < overhead <= 11
    no_frames = compress(None, b"rest")
    overhead = len(compress(None, b"rest", payload=payload)) - len(no_frames) - length
    assert 8 < overhead <= 11


def test_a_payload_in_the_free_bits_costs_only_the_section(free_bits_frames: FrameSet) -> None:
    plain = len(compress(free_bits_frames, learned=None))
    capacity = _free_bytes(compress(free_bits_frames, payload=bytes(100), learned=None))
    for length in (1, capacity // 2, capacity, capacity + 1, capacity + 10):
        blob = compress(free_bits_frames, payload=_random_payload(length), learned=None)
        # the section's entry (type, 1-byte length, CRC-32), mode, free and spread: 9 bytes
        assert len(blob) - plain == 9 + max(0, length - capacity)
