"""Local path of the learned codec: exact round trips, the integer kernel (local-lm-v2) against
the float model (local-lm-v1), golden streams decoded under other threads, batch sizes, SIMD
kernels and without torch, corruption, model loading and library errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from medzip_scp.codec.errors import (
    CorruptStreamError,
    IncompatibleLibraryError,
    UnknownModelError,
    UnsupportedFormatError,
)
from medzip_scp.codec.learned import bitplanes
from medzip_scp.codec.learned import local_path as L
from medzip_scp.codec.learned.local_path import intnet as K
from medzip_scp.codec.learned.local_path import model as M
from medzip_scp.codec.zoo import DEFAULT_MODELS_ROOT, MODELS, ModelStore

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"
GOLDEN = Path(__file__).with_name("local_golden.json")


def _v1_usable() -> bool:
    try:
        L.check_v1_libraries(adapter=True)
    except IncompatibleLibraryError:
        return False
    return True


needs_v1 = pytest.mark.skipif(
    not _v1_usable(), reason="local-lm-v1 needs torch/transformers/peft of V1_LIBRARIES"
)


@pytest.fixture(scope="module")
def model() -> L.LocalModel:
    return L.load_model()


@pytest.fixture(scope="module")
def model_v1() -> L.LocalModel:
    if not _v1_usable():
        pytest.skip("local-lm-v1 needs torch/transformers/peft of V1_LIBRARIES")
    return L.load_model("local-lm-v1")


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


def _goldens() -> list[dict]:
    return json.loads(GOLDEN.read_text())["streams"]


def _golden_parts(g: dict) -> tuple[np.ndarray, np.ndarray, bytes]:
    frame = np.frombuffer(bytes.fromhex(g["frame"]), "<u2").reshape(g["shape"])
    high, low = bitplanes.split(frame, g["bits"], g["s"])
    return high, low, bytes.fromhex(g["stream"])


def test_bitplanes_split_join():
    f = np.random.default_rng(1).integers(0, 1 << 12, (9, 11)).astype(np.uint16)
    for s in range(13):
        h, lo = bitplanes.split(f, 12, s)
        assert int(h.max()) < 1 << (12 - s) and int(lo.max(initial=0)) < max(1, 1 << s)
        np.testing.assert_array_equal(bitplanes.join(h, lo, s), f)
    with pytest.raises(ValueError):
        bitplanes.split(f, 12, 13)


def test_default_model_is_the_integer_kernel(model):
    assert model.model_id == "local-lm-v2" and model.int_net is not None and model.net is None
    high, low = bitplanes.split(_synthetic((16, 16)), 12, 2)
    assert L.encode_low(low, high, 2, 12, model)[4] == 2  # stream version 2


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


def test_encode_is_deterministic_and_batch_invariant(model):
    f = _synthetic((40, 64), seed=3)
    high, low = bitplanes.split(f, 12, 1)
    a = L.encode_low(low, high, 1, 12, model, chunk_tiles=3)
    assert a == L.encode_low(low, high, 1, 12, model, chunk_tiles=3, threads=2)
    assert a == L.encode_low(low, high, 1, 12, model, chunk_tiles=3, threads=None)
    for threads, batch in [(1, 1), (2, 3), (1, 100), (None, 2)]:
        out = L.decode_low(a, high, 1, 12, model, batch_chunks=batch, threads=threads)
        np.testing.assert_array_equal(out, low)


def test_encoder_batches_give_the_same_indices(model):
    high, low = bitplanes.split(_synthetic((48, 80), seed=8), 12, 3)
    ref = L._full_pass(model, high, low, 3, 12, batch_tiles=1024)
    for batch in (1, 4, 7):
        got = L._full_pass(model, high, low, 3, 12, batch_tiles=batch)
        for a, b in zip(ref[1:], got[1:], strict=True):
            np.testing.assert_array_equal(a, b)


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
    for version in (0, 1, 3):
        forged = bytearray(data)
        forged[4] = version
        with pytest.raises(CorruptStreamError, match="version"):
            L.decode_low(bytes(forged), high, 2, 12, model)
    other = high.copy()
    other[10, 10] ^= 1  # wrong high part: CRC or model state differs
    with pytest.raises(CorruptStreamError):
        L.decode_low(bytes(data), other, 2, 12, model)


def test_stream_of_another_model_is_refused(model, model_v1):
    high, low = bitplanes.split(_synthetic((16, 32)), 12, 2)
    with pytest.raises(CorruptStreamError, match="model"):
        L.decode_low(L.encode_low(low, high, 2, 12, model_v1), high, 2, 12, model)
    with pytest.raises(CorruptStreamError, match="model"):
        L.decode_low(L.encode_low(low, high, 2, 12, model), high, 2, 12, model_v1)


@pytest.mark.parametrize("name", ["local-lm-v1", "local-lm-v2"])
def test_missing_model_names_it(tmp_path, name):
    with pytest.raises(UnknownModelError, match=name):
        L.load_model(name, root=tmp_path)
    version = name.removeprefix("local-lm-")
    dst = tmp_path / "local-lm" / version
    shutil.copytree(DEFAULT_MODELS_ROOT / "local-lm" / version, dst)
    w = dst / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
    with pytest.raises(UnknownModelError, match="weights.safetensors"):
        L.load_model(name, root=tmp_path)
    with pytest.raises(UnknownModelError, match="no-such"):
        L.load_model(name, adapter="no-such")
    man = dst / "manifest.json"
    man.write_text(man.read_text().replace("\n}", "\n} "))
    with pytest.raises(UnknownModelError, match="manifest"):
        L.load_model(name, root=tmp_path)


def test_inexact_frequency_tables_are_refused(tmp_path):
    """Version 2 hands the shipped rows to the integer rANS unchanged: a row that does not sum to
    2**16, or has a zero entry, is refused at load time (not coded with)."""
    from safetensors.numpy import load_file, save_file

    dst = tmp_path / "local-lm" / "v99"
    shutil.copytree(DEFAULT_MODELS_ROOT / "local-lm" / "v2", dst)
    tabs = load_file(dst / "tables.safetensors")
    for zero_entry in (True, False):  # a zero entry (sum kept), then a sum of 2**16 - 1
        bad = {k: v.copy() for k, v in tabs.items()}
        row = bad["s2"][7, 3]
        big = row.argmax()
        if zero_entry:
            small = row.argmin()
            row[big] += row[small]
            row[small] = 0
        else:
            row[big] -= 1
        save_file(bad, dst / "tables.safetensors")
        L.write_manifest(dst)
        with pytest.raises(UnsupportedFormatError, match="local-lm-v99.*s2.*2\\*\\*16"):
            L.load_model("local-lm-v99", root=tmp_path)


def test_v1_streams_without_constriction_name_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "constriction", None)
    with pytest.raises(IncompatibleLibraryError, match="constriction"):
        L._constriction()


def test_store_names_a_missing_model_or_adapter_by_hash(tmp_path):
    entry = MODELS["local-lm-v2"]
    with pytest.raises(UnknownModelError, match="local-lm-v2") as err:
        ModelStore(root=tmp_path).load(entry.ref("ct"))
    assert err.value.model_sha256 == entry.manifest_sha256
    assert err.value.adapter_sha256 == entry.adapters["ct"]
    forged = entry.ref()
    forged = type(forged)(forged.model_id, forged.model_sha256, b"\x07" * 32)
    with pytest.raises(UnknownModelError, match="07" * 32):
        ModelStore().load(forged)


def test_adapter_roundtrip_and_header(model):
    ct = L.load_model(adapter="ct")
    assert ct.adapter_sha256 != bytes(32) and ct.sha256 == model.sha256
    assert ct.adapter_sha256.hex() == MODELS["local-lm-v2"].adapters["ct"]
    f = _synthetic((32, 48), seed=5)
    high, low = bitplanes.split(f, 12, 2)
    data = L.encode_low(low, high, 2, 12, ct)
    assert data != L.encode_low(low, high, 2, 12, model)
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
    with pytest.raises(ValueError):
        L.encode_low(low, high, 2, 12, model, chunk_tiles=0)


def test_empty_frame(model):
    high = np.zeros((0, 7), np.uint16)
    data = L.encode_low(high, high, 1, 8, model)
    assert L.decode_low(data, high, 1, 8, model).shape == (0, 7)


# -- the integer kernel ------------------------------------------------------------------------


def test_isqrt_is_exact():
    rng = np.random.default_rng(0)
    v = np.concatenate(
        [
            np.arange(1, 5000),
            rng.integers(1, 1 << 62, 20000),
            [(1 << 62) - 1, (1 << 31) ** 2, (1 << 31) ** 2 - 1, 2**52 + 1],
        ]
    ).astype(np.int64)
    r = K.isqrt(v)
    assert [math.isqrt(int(x)) for x in v] == r.tolist()


def test_ln_feature_is_close_to_log1p(model):
    net = model.int_net
    x = np.concatenate([np.arange(8, 9000), np.geomspace(9000, 2**20 - 1, 3000).astype(np.int64)])
    got = net._ln_ratio(x, 8) / 2**K.ACT
    np.testing.assert_allclose(got, np.log(x / 8), atol=2.0 ** (1 - K.ACT))  # 2 units


def test_layernorm_and_gelu_match_float(model):
    net = model.int_net
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, (500, 64)) * rng.uniform(0.01, 10, (500, 1))
    xi = np.rint(x * 2**K.ACT).astype(np.int64)
    ln = net.blocks[0].ln_1
    g = ln.g / 2**ln.shift
    b = ln.b / 2 ** (K.ACT + ln.shift)
    # |n x - sum x| far above 2**LN_C_BITS in the second case: rows rescaled before the square
    for xs in (xi, xi << 24):
        xr = xs / 2**K.ACT
        var = xr.var(1, keepdims=True)
        ref = (xr - xr.mean(1, keepdims=True)) / np.sqrt(var + K.LN_EPS) * g + b
        np.testing.assert_allclose(ln(xs) / 2**K.ACT, ref, atol=4e-3)
    h = np.arange(-12 << K.ACT, 12 << K.ACT, 7)
    hr = h / 2**K.ACT
    ref = 0.5 * hr * (1 + np.tanh(math.sqrt(2 / math.pi) * (hr + 0.044715 * hr**3)))
    np.testing.assert_allclose(net._gelu(h) / 2**K.ACT, ref, atol=2.0**-K.ACT)


def test_exactness_bounds_are_checked(model):
    from safetensors.numpy import load_file

    t = load_file(DEFAULT_MODELS_ROOT / "local-lm" / "v2" / "weights.safetensors")
    margins = K.IntNet(t, 4).margins
    assert max(margins.values()) < 50  # every float64 partial sum < 2**50 (< 2**53 needed)
    t["h.1.mlp.c_fc.weight"] = t["h.1.mlp.c_fc.weight"].astype(np.int64) << 20
    with pytest.raises(ValueError, match="2\\*\\*53"):
        K.IntNet(t, 4)


def test_quantize_reproduces_the_shipped_model(tmp_path):
    from medzip_scp.codec.learned.local_path.quantize import quantize_model

    out = tmp_path / "local-lm" / "v2"
    quantize_model(DEFAULT_MODELS_ROOT / "local-lm" / "v1", out)
    shipped = DEFAULT_MODELS_ROOT / "local-lm" / "v2"
    assert (out / "manifest.json").read_bytes() == (shipped / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError):
        quantize_model(DEFAULT_MODELS_ROOT / "local-lm" / "v1", shipped)


@pytest.mark.parametrize("adapter", [None, "ct"])
def test_integer_kernel_code_length_matches_float(model_v1, adapter):
    """The integer model codes within 0.2 % of the float model it was quantised from."""
    v1 = L.load_model("local-lm-v1", adapter=adapter)
    v2 = L.load_model("local-lm-v2", adapter=adapter)
    frames = [(_synthetic((64, 96), seed=9), 12)]
    if DATA.is_dir():
        from medzip_scp.codec.learned.local_path.train import read_frames

        for rel in ("series/ct-phantom-1mm", "series/mr-t1-3d", "mr-epi/sag"):
            p = sorted(q for q in (DATA / rel).rglob("*") if q.is_file())[5]
            f, bits = read_frames(p)[0]
            h, w = f.shape
            frames.append((np.ascontiguousarray(f[h // 2 - 48 : h // 2 + 48, :128]), bits))
    for f, bits in frames:
        for s in (1, 3):
            high, low = bitplanes.split(f, bits, s)
            b1 = L.estimate_bits(low, high, s, bits, v1)
            b2 = L.estimate_bits(low, high, s, bits, v2)
            assert abs(b2 - b1) < 0.002 * b1, (s, bits, b1, b2)


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


# -- golden streams ----------------------------------------------------------------------------


def test_goldens_are_reproduced_by_the_encoder(model):
    for g in _goldens():
        if g["model"] != "local-lm-v2":
            continue
        high, low, stream = _golden_parts(g)
        m = L.load_model(g["model"], adapter=g["adapter"] or None)
        assert L.encode_low(low, high, g["s"], g["bits"], m, chunk_tiles=g["chunk_tiles"]) == (
            stream
        ), g["name"]


@needs_v1
def test_v1_goldens_still_decode_and_encode():
    for g in _goldens():
        if g["model"] != "local-lm-v1":
            continue
        high, low, stream = _golden_parts(g)
        m = L.load_model(g["model"], adapter=g["adapter"] or None)
        np.testing.assert_array_equal(L.decode_low(stream, high, g["s"], g["bits"], m), low)
        assert L.encode_low(low, high, g["s"], g["bits"], m, chunk_tiles=g["chunk_tiles"]) == (
            stream
        ), g["name"]


_DECODE_GOLDENS = """
import json, sys
import numpy as np
{setup}
from medzip_scp.codec.learned import bitplanes
from medzip_scp.codec.learned import local_path as L
for g in json.load(open({golden!r}))["streams"]:
    if not g["model"].endswith({version!r}):
        continue
    frame = np.frombuffer(bytes.fromhex(g["frame"]), "<u2").reshape(g["shape"])
    high, low = bitplanes.split(frame, g["bits"], g["s"])
    m = L.load_model(g["model"], adapter=g["adapter"] or None)
    out = L.decode_low(bytes.fromhex(g["stream"]), high, g["s"], g["bits"], m,
                       batch_chunks={batch}, threads={threads})
    assert np.array_equal(out, low), g["name"]
    print("ok", g["name"])
{check}
"""
_NO_TORCH = "for name in ('torch', 'transformers', 'peft'):\n    sys.modules[name] = None"
_NO_TORCH_NOR_CONSTRICTION = _NO_TORCH.replace("'peft')", "'peft', 'constriction')")
# version 2 streams are encoded too with those imports blocked: same bytes as the goldens
_ENCODE_V2_GOLDENS = """
for g in json.load(open({golden!r}))["streams"]:
    if g["model"] != "local-lm-v2":
        continue
    frame = np.frombuffer(bytes.fromhex(g["frame"]), "<u2").reshape(g["shape"])
    high, low = bitplanes.split(frame, g["bits"], g["s"])
    m = L.load_model(g["model"], adapter=g["adapter"] or None)
    data = L.encode_low(low, high, g["s"], g["bits"], m, chunk_tiles=g["chunk_tiles"])
    assert data.hex() == g["stream"], g["name"]
"""


def _run_decode(version: str, setup: str, check: str, batch, threads, env: dict) -> str:
    code = _DECODE_GOLDENS.format(
        setup=setup, golden=str(GOLDEN), version=version, batch=batch, threads=threads, check=check
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize(
    "batch, threads, env",
    [
        (1, 1, {"OPENBLAS_NUM_THREADS": "1", "OPENBLAS_CORETYPE": "Prescott"}),
        (4, 2, {"OPENBLAS_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell"}),
        (100, None, {"NPY_DISABLE_CPU_FEATURES": "<dispatched>"}),
    ],
)
def test_v2_goldens_decode_without_torch_anywhere(batch, threads, env):
    """Coding version-2 streams needs no torch/transformers/constriction (their import is
    blocked) and gives the same values under other BLAS kernels (SSE vs AVX2 vs the default),
    numpy without its run-time SIMD loops, other thread counts and batch sizes."""
    if env.get("NPY_DISABLE_CPU_FEATURES") == "<dispatched>":
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

        # every SIMD target numpy dispatches to at run time (AVX2, AVX-512, ...): baseline only
        wide = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
        env = {"NPY_DISABLE_CPU_FEATURES": ",".join(wide)}
    check = _ENCODE_V2_GOLDENS.format(golden=str(GOLDEN)) + (
        "assert all(sys.modules.get(n) is None for n in ('torch', 'transformers', 'constriction'))"
    )
    out = _run_decode("-v2", _NO_TORCH_NOR_CONSTRICTION, check, batch, threads, env)
    assert out.count("ok") == sum(g["model"] == "local-lm-v2" for g in _goldens())


@needs_v1
@pytest.mark.slow
@pytest.mark.parametrize("torch_threads, batch, capability", [(1, 1, "default"), (2, 3, "avx2")])
def test_v1_goldens_decode_under_other_threads_and_kernels(torch_threads, batch, capability):
    setup = f"import torch\ntorch.set_num_threads({torch_threads})"
    out = _run_decode("-v1", setup, "", batch, None, {"ATEN_CPU_CAPABILITY": capability})
    assert out.count("ok") == sum(g["model"] == "local-lm-v1" for g in _goldens())


def test_v1_model_without_torch_names_the_library():
    code = (
        "import sys\n" + _NO_TORCH + "\n"
        "from medzip_scp.codec.learned import local_path as L\n"
        "from medzip_scp.codec.errors import IncompatibleLibraryError\n"
        "try:\n    L.load_model('local-lm-v1')\nexcept IncompatibleLibraryError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # find_spec-free check: importlib.metadata still sees the installed distribution, so the
    # blocked import is what fails; the message must still name torch or transformers
    assert r.returncode == 0, r.stderr[-2000:]
    assert "local-lm-v1 streams need" in r.stdout and "pip install" in r.stdout


# -- local-lm-v1 (float) -----------------------------------------------------------------------


def test_incompatible_transformers_is_named(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version

    def fake(name: str) -> str:
        return "4.57.6" if name == "transformers" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", fake)
    with pytest.raises(IncompatibleLibraryError, match=r"transformers>=5\.24,<5\.26") as err:
        L.load_model("local-lm-v1")
    assert "installed 4.57.6" in str(err.value) and "pip install" in str(err.value)
    assert isinstance(err.value, UnsupportedFormatError)  # the blob is fine, this install is not

    def missing(name: str) -> str:
        if name == "torch":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(IncompatibleLibraryError, match="torch.*not installed"):
        L.load_model("local-lm-v1")
    with pytest.raises(IncompatibleLibraryError, match="torch"):
        ModelStore().load(MODELS["local-lm-v1"].ref())  # not turned into UnknownModelError


def test_pyproject_pins_the_v1_libraries():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for lib in L.V1_LIBRARIES:
        spec = next(d for d in deps if d.split(">")[0].split("<")[0] == lib)
        assert spec == lib + L._spec(lib), spec


@needs_v1
def test_v1_roundtrip_and_unsafe_tokens_use_the_recorded_fallback(model_v1, monkeypatch):
    f = _synthetic((32, 32), seed=7)
    high, low = bitplanes.split(f, 12, 2)
    plain = _roundtrip(f, 12, 2, model_v1)
    assert plain[4] == 1  # stream version 1
    monkeypatch.setattr(M, "EPS", 0.2)  # ~90 % of tokens marked unsafe at encode time
    data = L.encode_low(low, high, 2, 12, model_v1)
    n_unsafe = int.from_bytes(data[35:39], "little")
    assert n_unsafe > 0 and len(data) > len(plain)
    monkeypatch.setattr(M, "EPS", 1e-6)  # the decoder never looks at EPS
    np.testing.assert_array_equal(L.decode_low(data, high, 2, 12, model_v1), low)
