"""Global path (latent-variable model + bits-back ANS): round trips, payload, determinism.

The generic tests run with both released models: ``global-vae-v1`` (stream version 1,
constriction) and ``global-vae-v2`` (stream version 2, the integer coder). Tests specific to
the integer kernel and stream version 2 are in ``test_global_v2.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medzip_scp.codec.errors import CodecError, CorruptStreamError
from medzip_scp.codec.learned.bitplanes import split
from medzip_scp.codec.learned.global_path import (
    ModelNotFoundError,
    PayloadTooLargeError,
    decode_high,
    encode_high,
    load_model,
    payload_capacity,
)
from medzip_scp.codec.learned.global_path import coder as gcoder

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"
GOLDEN = Path(__file__).with_name("global_golden.json")


@pytest.fixture(scope="module", params=["global-vae-v1", "global-vae-v2"])
def model(request):
    return load_model(request.param)


def _flat_half(H: int, W: int, bits: int, seed: int) -> np.ndarray:
    """A frame whose flat half leaves several latent classes equally likely: it has capacity."""
    img = _synthetic(H, W, bits, seed)
    img[:, : W // 2] = 1000
    return img


def _synthetic(H: int, W: int, bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    smooth = (np.sin(xx / 9.0) + np.cos(yy / 6.0) + 2.0) / 4.2 * ((1 << bits) - 1)
    img = smooth + rng.normal(0, max(0.5, (1 << bits) / 500), (H, W))
    img[: H // 4, : W // 4] = 0  # flat background like CT air
    return np.clip(np.round(img), 0, (1 << bits) - 1).astype(np.uint16)


def _roundtrip(img, bits, model, payload=b""):
    data = encode_high(img, bits, model, payload)
    out, pl = decode_high(data, img.shape, bits, model)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, img)
    assert pl == payload
    return data


@pytest.mark.parametrize(
    "shape,bits",
    [
        ((1, 1), 1),
        ((1, 9), 8),
        ((9, 1), 8),
        ((2, 3), 1),
        ((5, 7), 2),
        ((17, 23), 12),
        ((40, 33), 16),
        ((64, 64), 10),
    ],
)
def test_round_trip_synthetic(model, shape, bits):
    _roundtrip(_synthetic(*shape, bits), bits, model)


def test_extreme_values(model):
    img = np.zeros((24, 24), np.uint16)
    img[::2, 1::2] = 65535  # worst-case residuals, full 16-bit range
    _roundtrip(img, 16, model, b"x")
    _roundtrip(np.full((8, 8), 7, np.uint16), 3, model)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 64])
def test_payload_round_trip(model, n):
    img = _synthetic(48, 48, 12, seed=n)
    payload = bytes(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8))
    _roundtrip(img, 12, model, payload)


def test_payload_zero_bytes_and_padding(model):
    img = _synthetic(32, 32, 12)
    _roundtrip(img, 12, model, b"\0" * 7)
    _roundtrip(img, 12, model, b"\xff" * 9)


def test_payload_beyond_capacity_is_stored_or_rejected(model):
    img = _flat_half(96, 96, 12, seed=3)
    cap = payload_capacity(img, 12, model)
    assert cap > 0
    big = bytes(np.random.default_rng(1).integers(0, 256, cap + 2000, dtype=np.uint8))
    empty = encode_high(img, 12, model)
    data = _roundtrip(img, 12, model, big)
    # the excess beyond the free capacity costs its own size, no more
    assert len(data) - len(empty) <= len(big) - cap + 16
    assert len(data) - len(empty) >= len(big) - cap - 64
    with pytest.raises(PayloadTooLargeError, match="exceeds this frame's free capacity"):
        encode_high(img, 12, model, big, strict=True)


def test_payload_within_capacity_rides_free(model):
    img = _flat_half(128, 128, 12, seed=5)
    cap = payload_capacity(img, 12, model)
    assert cap >= 16
    empty = encode_high(img, 12, model)
    payload = bytes(np.random.default_rng(2).integers(0, 256, cap, dtype=np.uint8))
    data = _roundtrip(img, 12, model, payload)
    assert len(data) <= len(empty) + 12  # free up to ANS word granularity
    encode_high(img, 12, model, payload, strict=True)


def test_encode_is_deterministic(model):
    img = _synthetic(40, 56, 12, seed=9)
    a = encode_high(img, 12, model, b"abc")
    b = encode_high(img.copy(), 12, model, b"abc")
    assert a == b


def test_decode_independent_of_torch_threads(model):
    torch = pytest.importorskip("torch")
    img = _synthetic(40, 40, 14, seed=4)
    data = encode_high(img, 14, model, b"meta")
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(decode_high(data, img.shape, 14, model))
            assert encode_high(img, 14, model, b"meta") == data
    finally:
        torch.set_num_threads(old)
    for out, pl in outs:
        np.testing.assert_array_equal(out, img)
        assert pl == b"meta"


def test_coder_batches_do_not_change_words():
    """Stream version 1's coder boundary: one constriction encode call per step vs. split calls
    give identical words."""
    import constriction

    model = load_model("global-vae-v1")
    rng = np.random.default_rng(0)
    n = 301
    rows = model.pmf[rng.integers(0, model.pmf.shape[0], n), rng.integers(0, 8, n)]
    sym = rng.integers(50, 77, n).astype(np.int32)
    cat = constriction.stream.model.Categorical(perfect=False)
    one = constriction.stream.stack.AnsCoder()
    one.encode_reverse(sym, cat, rows.astype(np.float64))
    many = constriction.stream.stack.AnsCoder()
    for lo, hi in reversed([(0, 1), (1, 100), (100, 101), (101, n)]):
        many.encode_reverse(sym[lo:hi], cat, rows[lo:hi].astype(np.float64))
    np.testing.assert_array_equal(one.get_compressed(), many.get_compressed())


def test_same_bytes_in_fresh_processes_with_other_thread_counts(model):
    code = (
        "import numpy as np, hashlib, sys;"
        f"sys.path.insert(0, {str(REPO)!r});"
        + "from medzip_scp.codec.learned.global_path import load_model, encode_high;"
        "import torch; torch.set_num_threads(int(sys.argv[1]));"
        "rng = np.random.default_rng(7);"
        "img = np.cumsum(rng.integers(-20, 21, (48, 48)), 1) + 3000;"
        "img = np.clip(img, 0, 4095).astype(np.uint16);"
        "print(hashlib.sha256(encode_high(img, 12, load_model(), b'p')).hexdigest())"
    )
    digests = set()
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        out = subprocess.run(
            [sys.executable, "-c", code, threads],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_golden_stream(model):
    """Pinned stream of each model (add a key with GENERATE_EXPECTED=1 when shipping a new id;
    never change an existing one)."""
    img = _synthetic(32, 48, 12, seed=11)
    digest = hashlib.sha256(encode_high(img, 12, model, b"golden")).hexdigest()
    key = f"{model.model_id}:{model.sha256[:16]}"
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("GENERATE_EXPECTED") == "1":
        golden[key] = digest
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    assert golden.get(key) == digest


def test_corrupted_stream_raises(model):
    img = _synthetic(32, 32, 12, seed=1)
    data = bytearray(encode_high(img, 12, model, b"secret"))
    rng = np.random.default_rng(0)
    for _ in range(40):
        bad = bytearray(data)
        pos = int(rng.integers(0, len(bad)))
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CorruptStreamError):
            decode_high(bytes(bad), img.shape, 12, model)
    with pytest.raises(CorruptStreamError):
        decode_high(bytes(data[:-4]), img.shape, 12, model)
    with pytest.raises(CorruptStreamError):
        decode_high(bytes(data) + b"\0\0\0\0", img.shape, 12, model)
    with pytest.raises(CorruptStreamError, match="expected"):
        decode_high(bytes(data), (32, 31), 12, model)


def test_bad_inputs(model):
    with pytest.raises(ValueError):
        encode_high(np.full((4, 4), 16, np.uint16), 4, model)
    with pytest.raises(ValueError):
        encode_high(np.zeros((4,), np.uint16), 4, model)
    with pytest.raises(ValueError):
        encode_high(np.zeros((4, 4), np.uint16), 0, model)


def test_missing_model_gives_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="global-vae-v9.*not installed"):
        load_model("global-vae-v9", root=tmp_path)
    assert issubclass(ModelNotFoundError, CodecError)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_tampered_weights_are_rejected(tmp_path, version):
    src = REPO / "models" / "global-vae" / version
    dst = tmp_path / "global-vae" / version
    shutil.copytree(src, dst)
    w = dst / "weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 1
    w.write_bytes(bytes(raw))
    with pytest.raises(ModelNotFoundError, match="sha256"):
        load_model(f"global-vae-{version}", root=tmp_path)


def test_real_frames(model):
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    from medzip_scp.codec.learned.global_path.train import read_frames

    cases = [
        ("series/ct-phantom-1mm/I500.dcm", (200, 160)),
        ("series/mr-t1-3d", (64, 64)),
        ("conformance/JPEGLSLossless/RG2_JLSL.dcm", (80, 120)),
    ]
    for rel, (h, w) in cases:
        p = DATA / rel
        if p.is_dir():
            p = sorted(p.glob("*.dcm"))[40]
        if not p.is_file():
            pytest.skip(f"{p} missing")
        frame, bits = read_frames(p)[0]
        y0, x0 = (frame.shape[0] - h) // 2, (frame.shape[1] - w) // 2
        frame = np.ascontiguousarray(frame[y0 : y0 + h, x0 : x0 + w])
        for s in (0, 2):
            high, _ = split(frame, bits, s)
            cap = payload_capacity(high, bits - s, model)
            payload = bytes(range(256))[: max(1, cap)]
            _roundtrip(high, bits - s, model, payload)


def test_fill_words_are_checked(model):
    words = gcoder._initial_words(b"abc", 3)
    assert gcoder._parse_initial(words) == b"abc"
    words[0] ^= 1
    with pytest.raises(CorruptStreamError, match="fill"):
        gcoder._parse_initial(words)
