"""Train the global-path latent-variable model (``medzip train global``).

The model (see the package docstring): a discrete latent class z per ``block`` x ``block``
block, p(x|z) a discretised logistic per pixel whose mean is a class-specific linear causal
predictor over ``[MED, W, N, NW, NE, WW, NN, NWW, NNW, NNE]`` and whose log scale is linear in
the quantised log of a causal gradient energy, p(z) a categorical. Training maximises the exact
block marginal ``log sum_z p(z) p(x_b | z)`` (the bits-back rate with the exact posterior) on
random crops of the high planes ``frame >> s`` (s in {0, 1, 2, 4}) of the training series, in
torch (float32, seeded, single thread). The result is then quantised to integers (coefficients
``2**-12``, scale slope/offset ``2**-8``, prior counts) and written with integer likelihood
tables: that integer model is what the coder uses, and what the card's numbers measure.

Usage::

    nice -n 10 .venv/bin/python -m medzip_scp.codec.learned.global_path.train \
        --data ../shared/data --out models/global-vae/v1 --seed 0 --minutes 4

``--quantize-from models/global-vae/v1 --out models/global-vae/v2`` trains nothing: it turns a
released model into one for stream version 2 (:func:`quantize_from`), in integer arithmetic
only, so the command gives the same bytes on every machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medzip_scp.codec.zoo import DEFAULT_MODELS_ROOT, DEFAULT_TRAINING_DATA

from .fixed import exp2neg_table, frequency_table, log2_fixed
from .kernel import all_features as _all_features
from .model import (
    COEF_SHIFT,
    EXP2NEG_LEN,
    NS,
    PMF_BITS,
    PRIOR_BITS,
    PRIOR_TOTAL,
    bucket_edges,
    build_tables,
    load_model_dir,
    save_model_dir,
)

__all__ = [
    "DEV_SETS",
    "TRAIN_GLOBS",
    "dev_files",
    "main",
    "quantize_from",
    "read_frames",
    "train",
]

MODEL_FAMILY = "global-vae"


def model_id_for(out_dir: Path) -> str:
    """The id a model trained into ``out_dir`` is released under: the family and the
    version folder's name (``models/global-vae/v2`` -> ``global-vae-v2``)."""
    return f"{MODEL_FAMILY}-{Path(out_dir).name}"


K_CLASSES = 16
BLOCK = 8
CROP = 32

# Training data: series that are NOT used for the dev numbers (split by series).
TRAIN_GLOBS = [
    "mr-epi/cor/*/*",
    "mr-epi/sag/*/*",
    "mr-epi/axmb/*/*",
    "series/fmri-ge/*/*.dcm",
    "series/mr-dti-enhanced/*.dcm",
    "series/mr-dti-enhanced/*/*.dcm",
    "conformance/LittleEndianExplicit/CT_small.dcm",
    "conformance/LittleEndianExplicit/MR_small.dcm",
    "conformance/LittleEndianExplicit/emri_small.dcm",
    "conformance/JPEG2000Lossless/693_J2KR.dcm",
    "conformance/JPEG2000Lossless/TOSHIBA_J2K_OpenJPEGv2Regression.dcm",
    "conformance/JPEG2000Lossless/TOSHIBA_J2K_SIZ0_PixRep1.dcm",
    "conformance/JPEGLosslessSV1/JPEGLosslessP14SV1_1s_1f_u_16_16.dcm",
    "conformance/JPEGLosslessSV1/JPEG-LL.dcm",
]
# Dev sets (held out entirely): same sets as benchmarks/predictive.py, EPI restricted to ax/.
DEV_SETS = {
    "CT": ["series/ct-phantom-1mm/*.dcm"],
    "MR-EPI": ["mr-epi/ax/*/*"],
    "MR": ["series/mr-t1-3d/*.dcm"],
    "CR/DX": [
        "conformance/JPEG2000Lossless/966_fixed.dcm",
        "conformance/JPEG2000Lossless/JPEG2KLossless_1s_1f_u_16_16.dcm",
        "conformance/JPEG2000Lossless/NM_Kakadu44_SOTmarkerincons.dcm",
        "conformance/JPEGLSLossless/RG2_JLSL.dcm",
    ],
}


def _glob(data: Path, patterns: list[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        out += sorted(p for p in data.glob(pat) if p.is_file() and p.suffix != ".py")
    return out


def dev_files(data: Path) -> dict[str, list[Path]]:
    return {k: _glob(data, v) for k, v in DEV_SETS.items()}


def read_frames(path: Path) -> list[tuple[np.ndarray, int]]:
    """Monochrome frames as uint16 (signed data shifted by 2**(bits-1)) with Bits Stored."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
                return []
            arr = ds.pixel_array
        except Exception:  # noqa: BLE001 - unreadable training files are skipped
            return []
    bits = int(ds.BitsStored)
    if bits > 16:
        return []
    arr = arr.reshape((-1, *arr.shape[-2:])).astype(np.int64)
    if int(ds.PixelRepresentation) == 1:
        arr = arr + (1 << (bits - 1))
    arr = arr & ((1 << bits) - 1)
    return [(np.ascontiguousarray(a, dtype=np.uint16), bits) for a in arr]


def _crops(
    data: Path, rng: np.random.Generator, n_crops: int, progress: Callable[[str], None] | None
) -> dict[str, np.ndarray]:
    files = _glob(data, TRAIN_GLOBS)
    frames: list[tuple[np.ndarray, int]] = []
    for p in files:
        fr = read_frames(p)
        if len(fr) > 8:  # multi-frame objects: a few frames each
            fr = [fr[i] for i in rng.choice(len(fr), 8, replace=False)]
        frames += [(f, b) for f, b in fr if min(f.shape) >= CROP]
    if progress:
        progress(f"{len(files)} training files, {len(frames)} frames")
    per = max(1, n_crops // len(frames) + 1)
    Fs, Ls, Xs, Ms = [], [], [], []
    for f, bits in frames:
        choices = [s for s in (0, 1, 2, 4) if bits - s >= 2]
        s = int(rng.choice(choices))
        hb = bits - s
        high = (f >> s).astype(np.int64)
        F, lg8, lg8b = _all_features(high, hb)
        H, W = high.shape
        F = F.reshape(H, W, -1)
        lg8 = np.stack([lg8.reshape(H, W), lg8b.reshape(H, W)], -1)
        for _ in range(per):
            y = int(rng.integers(0, (H - CROP) // BLOCK + 1)) * BLOCK
            x = int(rng.integers(0, (W - CROP) // BLOCK + 1)) * BLOCK
            sl = (slice(y, y + CROP), slice(x, x + CROP))
            xc = high[sl]
            if xc.max() == xc.min():
                continue

            def blocks(a: np.ndarray) -> np.ndarray:
                a = a.reshape(CROP // BLOCK, BLOCK, CROP // BLOCK, BLOCK, *a.shape[2:])
                a = np.moveaxis(a, 2, 1)
                return a.reshape((CROP // BLOCK) ** 2, BLOCK * BLOCK, *a.shape[4:])

            Fs.append(blocks(F[sl]))
            Ls.append(blocks(lg8[sl]))
            Xs.append(blocks(xc))
            Ms.append((1 << hb) - 1)
    idx = rng.permutation(len(Xs))[:n_crops]
    x = np.stack(Xs)[idx].astype(np.float64)
    maxv = np.array(Ms, np.float64)[idx]
    # predictors are constrained to sum to one, so a per-crop offset cancels exactly: train on
    # values relative to the crop mean (keeps float32 precise and Adam steps scale-free)
    c = np.round(x.mean(axis=(1, 2)))[:, None, None]
    return {
        "F": (np.stack(Fs)[idx] - c[..., None]).astype(np.float32),
        "lg8": np.stack(Ls)[idx].astype(np.float32),
        "x": (x - c).astype(np.float32),
        "lo": x <= 0,
        "hi": x >= maxv[:, None, None],
    }


def _init_params(K: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = np.zeros((6, 10))
    base[0, 0] = 1.0  # MED
    base[1, [1, 2, 3]] = [1.0, 1.0, -1.0]  # plane
    base[2, [1, 2]] = [0.5, 0.5]
    base[3, 1] = 1.0  # W
    base[4, 2] = 1.0  # N
    base[5, [1, 2, 3, 4]] = [0.75, 0.5, -0.5, 0.25]
    coef = base[np.arange(K) % 6] + rng.normal(0, 0.02, (K, 10))
    coef /= coef.sum(1, keepdims=True)
    b = np.linspace(-16, 16, K)[rng.permutation(K)]
    return {"coef": coef, "a": np.full(K, 0.5), "c": np.full(K, 0.5), "b": b, "logits": np.zeros(K)}


def _coef(raw):  # type: ignore[no-untyped-def]
    """Predictor weights constrained to sum to one (offset invariance)."""
    return raw - (raw.sum(-1, keepdims=True) - 1.0) / raw.shape[-1]


def _nll_bits(batch: dict, params: dict):  # type: ignore[no-untyped-def]
    import torch
    import torch.nn.functional as Fn

    F, lg8, x = batch["F"], batch["lg8"], batch["x"]
    mu = F @ _coef(params["coef"]).T  # (B, nb, P, K)
    sidx = (lg8[..., 0, None] * params["a"] + lg8[..., 1, None] * params["c"] + params["b"]).clamp(
        0, NS - 1
    )
    log_s = (sidx / 8.0 - 3.0) * float(np.log(2.0))
    inv = torch.exp(-log_s)
    xe = x[..., None]
    a = (xe + 0.5 - mu) * inv
    b = (xe - 0.5 - mu) * inv
    lo = batch["lo"][..., None]
    hi = batch["hi"][..., None]
    lp = Fn.logsigmoid(a) + Fn.logsigmoid(-b) + torch.log((-torch.expm1(-inv)).clamp_min(1e-12))
    lp = torch.where(lo & ~hi, Fn.logsigmoid(a), lp)
    lp = torch.where(hi & ~lo, Fn.logsigmoid(-b), lp)
    lp = lp.clamp_min(-60.0)
    lb = lp.sum(2) + torch.log_softmax(params["logits"], 0)  # (B, nb, K)
    return -(torch.logsumexp(lb, -1).sum()) / (x.numel() * float(np.log(2.0)))


def _quantise(params: dict[str, np.ndarray], block: int) -> dict[str, np.ndarray]:
    c = _coef(params["coef"])
    coef = np.clip(np.round(c * (1 << COEF_SHIFT)), -(1 << 20), 1 << 20)
    coef[:, 0] += (1 << COEF_SHIFT) - coef.sum(1)  # exact sum 1: offset invariant in integers
    p = np.exp(params["logits"] - params["logits"].max())
    p /= p.sum()
    prior = np.maximum(1, np.round(p * PRIOR_TOTAL)).astype(np.int64)
    prior[np.argmax(prior)] += PRIOR_TOTAL - prior.sum()
    prior_len = np.round(-256 * np.log2(prior / prior.sum())).astype(np.int64)
    tab = build_tables()
    return {
        "coef": coef.astype(np.int64),
        "scale_a": np.round(params["a"] * 256).astype(np.int64),
        "scale_b": np.round(params["b"] * 256).astype(np.int64),
        "scale_c": np.round(params["c"] * 256).astype(np.int64),
        "prior": prior,
        "prior_len": prior_len,
        **tab,
    }


def train(
    data_root: Path,
    out_dir: Path,
    seed: int = 0,
    minutes: float = 4.0,
    progress: Callable[[str], None] | None = None,
    n_crops: int = 6000,
    steps: int | None = None,
) -> dict:
    """Train, quantise and write the model to ``out_dir``; return a summary dict.

    Parameters
    ----------
    data_root
        The shared data folder (``../shared/data``).
    out_dir
        Where ``weights.safetensors`` and ``manifest.json`` go (``models/global-vae/v1``).
    seed
        Seeds numpy (crop sampling, initialisation) and torch.
    minutes
        Wall-time budget of the optimisation loop (an upper bound when ``steps`` is given).
    steps
        Exact number of Adam steps (reproducible result for a seed); ``None``: until
        ``minutes`` have passed.
    progress
        Optional callback receiving one-line status strings.
    """
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    data = _crops(Path(data_root), rng, n_crops, progress)
    out = _fit(data, steps, rng, t0, minutes, progress)
    return _write(out, Path(data_root), Path(out_dir), seed, minutes, t0)


def _fit(
    data: dict,
    max_steps: int | None,
    rng: np.random.Generator,
    t0: float,
    minutes: float,
    progress: Callable[[str], None] | None,
) -> dict:
    import torch

    n = data["x"].shape[0]
    n_dev = max(1, n // 10)
    tens = {k: torch.from_numpy(v) for k, v in data.items()}
    init = _init_params(K_CLASSES, rng)
    params = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in init.items()}
    opt = torch.optim.Adam(
        [
            {"params": [params["coef"]], "lr": 3e-3},
            {"params": [params["a"], params["c"]], "lr": 1e-2},
            {"params": [params["b"], params["logits"]], "lr": 5e-2},
        ]
    )
    base_lr = [g["lr"] for g in opt.param_groups]

    def sub(i: np.ndarray) -> dict:
        return {k: v[i] for k, v in tens.items()}

    dev = sub(np.arange(n_dev))
    with torch.no_grad():
        start = float(_nll_bits(dev, params))
    step, bs = 0, 32
    t_loop = time.perf_counter()
    deadline = t_loop + 60.0 * minutes
    hist = []
    while (now := time.perf_counter()) < deadline and (max_steps is None or step < max_steps):
        if max_steps is None:
            frac = (now - t_loop) / max(1e-9, deadline - t_loop)
        else:  # schedule by step count: the same result on any machine
            frac = step / max_steps
        for g, lr in zip(opt.param_groups, base_lr, strict=False):
            g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, frac))))
        i = rng.integers(n_dev, n, bs)
        loss = _nll_bits(sub(i), params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            with torch.no_grad():
                d = float(_nll_bits(dev, params))
            hist.append((step, d))
            if progress:
                progress(
                    f"step {step}: train {float(loss.detach()):.4f} bpp, held-out crops {d:.4f} bpp"
                )
    with torch.no_grad():
        final = float(_nll_bits(dev, params))
    npar = {k: v.detach().double().numpy() for k, v in params.items()}
    return {
        "params": npar,
        "steps": step,
        "crops": n,
        "start": start,
        "final": final,
        "history": hist,
    }


def _write(fit: dict, data_root: Path, out_dir: Path, seed: int, minutes: float, t0: float) -> dict:
    npar, step, n, start, final, hist = (
        fit[k] for k in ("params", "steps", "crops", "start", "final", "history")
    )
    q = _quantise(npar, BLOCK)
    meta = {
        "block": str(BLOCK),
        "K": str(K_CLASSES),
        "seed": str(seed),
        "crop": str(CROP),
        "features": "MED,W,N,NW,NE,WW,NN,NWW,NNW,NNE",
    }
    model_id = model_id_for(out_dir)
    digest = save_model_dir(Path(out_dir), model_id, q, meta)
    summary = {
        "model_id": model_id,
        "sha256": digest,
        "steps": step,
        "crops": n,
        "heldout_crop_bpp_start": start,
        "heldout_crop_bpp_final": final,
        "wall_s": time.perf_counter() - t0,
        "seed": seed,
        "minutes": minutes,
        "train_files": [str(p.relative_to(data_root)) for p in _glob(Path(data_root), TRAIN_GLOBS)],
        "history": hist,
        "coef": _coef(npar["coef"]).round(4).tolist(),
        "a": npar["a"].round(4).tolist(),
        "c": npar["c"].round(4).tolist(),
        "b": npar["b"].round(3).tolist(),
        "prior": (q["prior"] / PRIOR_TOTAL).round(4).tolist(),
    }
    (Path(out_dir) / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _len256(counts: np.ndarray, total_bits: int) -> np.ndarray:
    """``round(-256 * log2(counts / 2**total_bits))`` in integer arithmetic (1/256 bit)."""
    return (total_bits << 8) - ((log2_fixed(counts, 16) + 128) >> 8)


def quantize_from(src_dir: Path, out_dir: Path) -> dict[str, str]:
    """Write the stream-version-2 model of the released model in ``src_dir`` to ``out_dir``.

    The trained parameters (predictor coefficients, scale parameters) are copied; the tables
    become exact integer tables for the integer coder, computed in integer arithmetic only:
    ``pmf`` rows and ``prior`` scaled to sum exactly to ``2**24`` / ``2**16`` (entries >= 1,
    :func:`.fixed.frequency_table`), ``sym_len`` / ``prior_len`` from them
    (:func:`.fixed.log2_fixed`), ``exp2neg`` from integer roots (:func:`.fixed.exp2neg_table`).
    Refuses to overwrite a model folder.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if (out_dir / "manifest.json").exists():
        raise FileExistsError(
            f"{out_dir} already holds a model; a model version is never rewritten"
        )
    src = load_model_dir(model_id_for(src_dir), src_dir)
    pmf = frequency_table(src.pmf.astype(np.int64), PMF_BITS)
    prior = frequency_table(src.prior[None, :], PRIOR_BITS)[0]
    _, _, mbits = bucket_edges()
    mant = np.concatenate([mbits[1:][::-1], mbits])  # mantissa bits of symbols 0..126
    tensors = {
        "coef": src.coef,
        "scale_a": src.scale_a,
        "scale_b": src.scale_b,
        "scale_c": src.scale_c,
        "prior": prior,
        "prior_len": _len256(prior, PRIOR_BITS),
        "pmf": pmf,
        "sym_len": _len256(pmf, PMF_BITS) + (mant << 8),
        "exp2neg": exp2neg_table(EXP2NEG_LEN, 256, PMF_BITS),
    }
    meta = {
        "block": str(src.block),
        "K": str(src.K),
        "features": src.extra.get("features", ""),
        "stream": "2",
        "quantized_from": f"{src.model_id} {src.sha256}",
    }
    model_id = model_id_for(out_dir)
    digest = save_model_dir(out_dir, model_id, tensors, meta)
    return {"model_id": model_id, "sha256": digest, "quantized_from": meta["quantized_from"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the global-path model (medzip train global)")
    ap.add_argument("--data", type=Path, default=DEFAULT_TRAINING_DATA)
    ap.add_argument("--out", type=Path, default=DEFAULT_MODELS_ROOT / "global-vae" / "v1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=None, help="exact number of steps")
    ap.add_argument(
        "--quantize-from",
        type=Path,
        default=None,
        help="released model folder to turn into a stream-version-2 model at --out (no training)",
    )
    args = ap.parse_args(argv)
    if args.quantize_from is not None:
        print(json.dumps(quantize_from(args.quantize_from, args.out), indent=1))
        return 0
    if not args.data.is_dir():
        print(f"data folder {args.data} not found", file=sys.stderr)
        return 2
    s = train(
        args.data,
        args.out,
        args.seed,
        args.minutes,
        steps=args.steps,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(
        json.dumps(
            {
                k: s[k]
                for k in (
                    "model_id",
                    "sha256",
                    "steps",
                    "heldout_crop_bpp_start",
                    "heldout_crop_bpp_final",
                    "wall_s",
                )
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
