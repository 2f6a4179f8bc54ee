"""Local path of the learned codec: exact round trips, determinism, corruption, model loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medzip_scp.codec.errors import CorruptStreamError, UnknownModelError
from medzip_scp.codec.learned import bitplanes
from medzip_scp.codec.learned import local_path as L

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def model() -> L.LocalModel:
    return L.load_model()


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _synthetic(shape=(40, 52), bits=12, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    img = 1500 + 400 * np.sin(x / 7.0) * np.cos(y / 9.0) + rng.normal(0, 6, shape)
    img[:6, :10] = 0  # flat background
    return np.clip(img, 0, (1 << bits) - 1).astype(np.uint16)


def _roundtrip(frame, bits, s, model, **kw):
    high, low = bitplanes.split(frame, bits, s)
    data = L.encode_low(low, high, s, bits, model, **kw)
    out = L.decode_low(data, high, s, bits, model)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, low)
    assert np.array_equal(bitplanes.join(high, out, s), frame)
    return data


def test_bitplanes_split_join():
    f = np.random.default_rng(1).integers(0, 1 << 12, (9, 11)).astype(np.uint16)
    for s in range(13):
        h, lo = bitplanes.split(f, 12, s)
        assert int(h.max()) < 1 << (12 - s) and int(lo.max(initial=0)) < max(1, 1 << s)
        np.testing.assert_array_equal(bitplanes.join(h, lo, s), f)
    with pytest.raises(ValueError):
        bitplanes.split(f, 12, 13)


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_roundtrip_synthetic(model, s):
    _roundtrip(_synthetic(), 12, s, model)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 33)])
def test_roundtrip_odd_shapes(model, shape):
    f = np.random.default_rng(2).integers(0, 1 << 10, shape).astype(np.uint16)
    _roundtrip(f, 10, 2, model)


def test_roundtrip_16bit_extremes(model):
    f = np.array([[0, 65535, 1, 65534], [65535, 0, 32768, 7]] * 3, dtype=np.uint16)
    _roundtrip(f, 16, 4, model)


def test_estimate_matches_stream(model):
    f = _synthetic((64, 64))
    high, low = bitplanes.split(f, 12, 2)
    est = L.estimate_bits(low, high, 2, 12, model)
    n = len(L.encode_low(low, high, 2, 12, model))
    assert abs(n * 8 - est) < 0.02 * est + 600


def test_encode_is_deterministic_and_batch_invariant(model, restore_threads):
    f = _synthetic((40, 64), seed=3)
    high, low = bitplanes.split(f, 12, 1)
    a = L.encode_low(low, high, 1, 12, model, chunk_tiles=3)
    assert a == L.encode_low(low, high, 1, 12, model, chunk_tiles=3)
    outs = []
    for threads, batch in [(1, 1), (2, 3), (1, 100), (2, 2)]:
        torch.set_num_threads(threads)
        outs.append(L.decode_low(a, high, 1, 12, model, batch_chunks=batch, threads=None))
    for o in outs:
        np.testing.assert_array_equal(o, low)
    torch.set_num_threads(2)
    assert a == L.encode_low(low, high, 1, 12, model, chunk_tiles=3, threads=None)
    assert a == L.encode_low(low, high, 1, 12, model, chunk_tiles=3, threads=1)


def test_corrupted_stream_raises(model):
    f = _synthetic((48, 48), seed=4)
    high, low = bitplanes.split(f, 12, 2)
    data = bytearray(L.encode_low(low, high, 2, 12, model))
    rng = np.random.default_rng(0)
    for pos in rng.integers(40, len(data) - 4, 8):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CorruptStreamError):
            L.decode_low(bytes(bad), high, 2, 12, model)
    with pytest.raises(CorruptStreamError):
        L.decode_low(bytes(data[:-7]), high, 2, 12, model)
    with pytest.raises(CorruptStreamError):
        L.decode_low(bytes(data) + b"\0", high, 2, 12, model)
    with pytest.raises(CorruptStreamError):
        L.decode_low(bytes(data), high, 1, 12, model)  # wrong split plane
    other = high.copy()
    other[10, 10] ^= 1  # wrong high part: CRC or model state differs
    with pytest.raises(CorruptStreamError):
        L.decode_low(bytes(data), other, 2, 12, model)


def test_missing_model_names_it(tmp_path):
    with pytest.raises(UnknownModelError, match="local-lm-v1"):
        L.load_model("local-lm-v1", root=tmp_path)
    src = L.MODELS_ROOT / "local-lm" / "v1"
    dst = tmp_path / "local-lm" / "v1"
    shutil.copytree(src, dst)
    w = dst / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    with pytest.raises(UnknownModelError, match="weights.safetensors"):
        L.load_model("local-lm-v1", root=tmp_path)
    with pytest.raises(UnknownModelError, match="no-such"):
        L.load_model("local-lm-v1", adapter="no-such")
    man = dst / "manifest.json"
    man.write_text(man.read_text().replace("\n}", "\n} "))
    with pytest.raises(UnknownModelError, match="manifest"):
        L.load_model("local-lm-v1", root=tmp_path)


def test_adapter_roundtrip_and_header(model):
    ct = L.load_model(adapter="ct")
    assert ct.adapter_sha256 != bytes(32) and ct.sha256 == model.sha256
    f = _synthetic((32, 48), seed=5)
    high, low = bitplanes.split(f, 12, 2)
    data = L.encode_low(low, high, 2, 12, ct)
    np.testing.assert_array_equal(L.decode_low(data, high, 2, 12, ct), low)
    with pytest.raises(CorruptStreamError, match="adapter"):
        L.decode_low(data, high, 2, 12, model)


def test_choose_split(model):
    f = _synthetic((48, 64), seed=6)
    s, cost = L.choose_split(f, 12, model, (1, 2))
    assert set(cost) == {0, 1, 2} and cost[s] == min(cost.values())


def test_invalid_arguments(model):
    f = _synthetic((8, 8))
    high, low = bitplanes.split(f, 12, 2)
    with pytest.raises(ValueError):
        L.encode_low(low, high, 0, 12, model)
    with pytest.raises(ValueError):
        L.encode_low(low | 4, high, 2, 12, model)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")
@pytest.mark.parametrize(
    "rel, s",
    [
        ("series/ct-phantom-1mm/I500.dcm", 2),
        ("series/mr-t1-3d", 1),
        ("conformance/JPEGLSLossless/RG2_JLSL.dcm", 2),
    ],
)
def test_roundtrip_real_crops(model, rel, s):
    from medzip_scp.codec.learned.local_path.train import read_frames

    p = DATA / rel
    if p.is_dir():
        p = sorted(p.glob("*.dcm"))[40]
    frame, bits = read_frames(p)[0]
    h, w = frame.shape
    crop = frame[h // 2 - 48 : h // 2 + 48, w // 2 - 64 : w // 2 + 40]
    _roundtrip(np.ascontiguousarray(crop), bits, s, model)


def test_unsafe_tokens_use_the_recorded_fallback(model, monkeypatch):
    from medzip_scp.codec.learned.local_path import model as M

    f = _synthetic((32, 32), seed=7)
    high, low = bitplanes.split(f, 12, 2)
    plain = L.encode_low(low, high, 2, 12, model)
    monkeypatch.setattr(M, "EPS", 0.2)  # ~90 % of tokens marked unsafe at encode time
    data = L.encode_low(low, high, 2, 12, model)
    n_unsafe = int.from_bytes(data[35:39], "little")
    assert n_unsafe > 0 and len(data) > len(plain)
    monkeypatch.setattr(M, "EPS", 1e-6)  # the decoder never looks at EPS
    np.testing.assert_array_equal(L.decode_low(data, high, 2, 12, model), low)


def test_empty_frame(model):
    high = np.zeros((0, 7), np.uint16)
    data = L.encode_low(high, high, 1, 8, model)
    assert L.decode_low(data, high, 1, 8, model).shape == (0, 7)
