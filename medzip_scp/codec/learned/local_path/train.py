"""Train the local-path model (``medzip train local``) from the shared data, split by series.

Usage::

    nice -n 10 .venv/bin/python -m medzip_scp.codec.learned.local_path.train \
        --data ../shared/data --out /tmp/local-float --seed 0 --minutes 8
    # then optional per-modality LoRA adapters on it (3 minutes each):
    nice -n 10 .venv/bin/python -m medzip_scp.codec.learned.local_path.train \
        --out /tmp/local-float --adapter ct --seed 0 --minutes 3
    # the integer model the codec runs (:mod:`.quantize`; seconds, no torch), released as a new
    # version (local-lm-v2 was made this way from local-lm-v1):
    .venv/bin/python -m medzip_scp.codec.learned.local_path.train \
        --quantize-from /tmp/local-float --out models/local-lm/v3

One torch thread by default (``--threads``): on a shared 2-core machine two threads of these small
ops run several times slower.  Training stops on wall time, so the step count (recorded in
``config.json``) depends on the machine's load; everything else is seeded.

Training series (all lossless-origin): mr-epi ``ax/`` and ``cor/``, ``series/fmri-ge`` (every
3rd file), ``series/mr-dti-enhanced/3000.dcm`` (every 8th frame), the lossless conformance CT
slices of five different series (``693_J2KR``, ``J2K_pixelrep_mismatch``,
``TOSHIBA_J2K_OpenJPEGv2Regression``, ``TOSHIBA_J2K_SIZ0_PixRep1``, ``explicit_VR-UN``),
``CT_small``, ``MR_small``, ``emri_small``, ``JPEG-LL`` (NM) and the 16-bit OT of JPEG Lossless
SV1.  Held out (dev): ``series/ct-phantom-1mm``, ``series/mr-t1-3d``, mr-epi ``sag/`` and
``axmb/``, and the four CR/DX files of the benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from medzip_scp.codec.zoo import DEFAULT_TRAINING_DATA

from . import float_net as F
from . import model as M
from . import write_manifest

TRAIN_FILES = [
    "conformance/JPEG2000Lossless/693_J2KR.dcm",
    "conformance/JPEG2000Lossless/J2K_pixelrep_mismatch.dcm",
    "conformance/JPEG2000Lossless/TOSHIBA_J2K_OpenJPEGv2Regression.dcm",
    "conformance/JPEG2000Lossless/TOSHIBA_J2K_SIZ0_PixRep1.dcm",
    "conformance/JPEG2000Lossless/explicit_VR-UN.dcm",
    "conformance/LittleEndianExplicit/CT_small.dcm",
    "conformance/LittleEndianExplicit/MR_small.dcm",
    "conformance/LittleEndianExplicit/emri_small.dcm",
    "conformance/JPEGLosslessSV1/JPEG-LL.dcm",
    "conformance/JPEGLosslessSV1/JPEGLosslessP14SV1_1s_1f_u_16_16.dcm",
]
CR_DX_DEV = [
    "conformance/JPEG2000Lossless/966_fixed.dcm",
    "conformance/JPEG2000Lossless/JPEG2KLossless_1s_1f_u_16_16.dcm",
    "conformance/JPEG2000Lossless/NM_Kakadu44_SOTmarkerincons.dcm",
    "conformance/JPEGLSLossless/RG2_JLSL.dcm",
]
S_WEIGHTS = np.array([0.3, 0.3, 0.2, 0.2])


def read_frames(path: Path, step: int = 1) -> list[tuple[npt.NDArray[np.uint16], int]]:
    """Frames of a DICOM file as uint16 (signed data shifted by 2**(bits-1)) with their bits."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    bits = int(ds.BitsStored)
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1 or bits > 16:
        return []
    arr = arr.reshape((-1, *arr.shape[-2:])).astype(np.int64)[::step]
    if int(ds.PixelRepresentation) == 1:
        arr = arr + (1 << (bits - 1))
    arr = np.clip(arr, 0, (1 << bits) - 1)  # values outside Bits Stored are not image data
    return [(np.ascontiguousarray(a, dtype=np.uint16), bits) for a in arr]


def train_sources(data: Path) -> list[Path]:
    epi = sorted(p for d in ("ax", "cor") for p in (data / "mr-epi" / d).glob("*/*") if p.is_file())
    fmri = sorted(p for p in (data / "series/fmri-ge").rglob("*") if p.is_file())
    dti = [data / "series/mr-dti-enhanced/3000.dcm"]
    return [data / f for f in TRAIN_FILES] + epi + fmri[::3] + dti


def dev_sources(data: Path) -> dict[str, list[Path]]:
    epi = sorted(
        p for d in ("sag", "axmb") for p in (data / "mr-epi" / d).glob("*/*") if p.is_file()
    )
    return {
        "CT": sorted((data / "series/ct-phantom-1mm").glob("*.dcm"))[::7],
        "MR-EPI": epi[::4],
        "MR": sorted((data / "series/mr-t1-3d").glob("*.dcm"))[::8],
        "CR/DX": [data / p for p in CR_DX_DEV],
    }


def tile_examples(
    frame: npt.NDArray[np.uint16], bits: int, s: int, tiles: npt.NDArray[np.int64] | None
) -> dict[str, npt.NDArray]:
    """Teacher-forced features of whole tiles (as the encoder computes them)."""
    g = M.Geometry.of(*frame.shape)
    high, low = frame >> s, frame & ((1 << s) - 1)
    base = g.pad(high, "edge") << s
    full = base + g.pad(low, "zero")
    if tiles is None:
        tiles = np.arange(g.n_tiles)
    tt = np.repeat(tiles, M.TOKENS)
    ts = np.tile(np.arange(M.TOKENS), len(tiles))
    y0, x0 = g.block_origin(tt, ts)
    f, off = M.features(full, base, y0, x0, ts, s, bits)
    py = y0[:, None] + M._POFF[None, :, 0]
    px = x0[:, None] + M._POFF[None, :, 1]
    n = len(tiles)
    return {
        "f": f.astype(np.float32).reshape(n, M.TOKENS, M.N_FEAT),
        "off": off.astype(np.float32).reshape(n, M.TOKENS, 4),
        "low": (full[py, px] - base[py, px]).astype(np.float32).reshape(n, M.TOKENS, 4),
        "val": g.valid(py, px).reshape(n, M.TOKENS, 4),
        "s": np.full(n, s, np.int64),
    }


def build_set(
    paths: list[Path],
    rng: np.random.Generator,
    tiles_per_frame: int,
    max_tiles: int,
    frame_step: int = 1,
) -> dict[str, npt.NDArray]:
    parts: list[dict[str, npt.NDArray]] = []
    total = 0
    for p in paths:
        step = 8 if "mr-dti" in str(p) else frame_step
        for fr, bits in read_frames(p, step):
            if fr.max() == fr.min():
                continue
            s = int(rng.choice(np.arange(1, 5), p=S_WEIGHTS))
            s = min(s, bits - 1)
            g = M.Geometry.of(*fr.shape)
            k = min(g.n_tiles, tiles_per_frame * (3 if "conformance" in str(p) else 1))
            tiles = np.sort(rng.choice(g.n_tiles, size=k, replace=False))
            parts.append(tile_examples(fr, bits, s, tiles))
            total += k
            if total >= max_tiles:
                break
        if total >= max_tiles:
            break
    return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}


def _loss(net: F.LocalNet, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    raw, _ = net(b["f"])
    bits = F.nll_bits(raw, b["off"], b["low"], b["s"][:, None, None].float())
    v = b["val"]
    return (bits * v).sum(), (b["s"][:, None, None] * v).sum()


def evaluate(net: F.LocalNet, data: dict[str, npt.NDArray], batch: int = 64) -> float:
    """Bits per low bit (1.0 = incompressible) on a set of tiles."""
    tot = ref = 0.0
    with torch.no_grad():
        for a in range(0, len(data["s"]), batch):
            b = {k: torch.from_numpy(v[a : a + batch]) for k, v in data.items()}
            bits_sum, r = _loss(net, b)
            tot += float(bits_sum)
            ref += float(r)
    return tot / max(ref, 1.0)


def save_model(net: F.LocalNet, out_dir: Path, info: dict) -> None:
    """Write weights, tables, config and the sha256 manifest to ``out_dir``."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().contiguous().numpy() for k, v in net.state_dict().items()}
    save_file(sd, out_dir / "weights.safetensors")
    tabs = {f"s{s}": M.build_table(s).astype(np.uint16) for s in range(1, M.S_MAX + 1)}
    save_file(tabs, out_dir / "tables.safetensors")
    (out_dir / "config.json").write_text(
        json.dumps({"net": net.cfg.to_dict(), "train": info}, indent=1)
    )
    write_manifest(out_dir)


def train(
    data_root: Path,
    out_dir: Path,
    seed: int,
    minutes: float,
    progress: Callable[[dict], None] | None = None,
    cfg: M.NetConfig | None = None,
    max_tiles: int = 16000,
) -> dict:
    """Train from scratch, seeded; write the model to ``out_dir``; return a summary.

    Deterministic data order (numpy Generator(seed)); ``torch.manual_seed(seed)``.  Training
    stops after ``minutes`` of wall time (so the number of steps depends on the machine; it is
    recorded in the summary and the config).
    """
    if (out_dir / "manifest.json").exists():
        raise FileExistsError(
            f"{out_dir} already holds a model; model ids are never reused: choose a new version"
        )
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_set = build_set(train_sources(data_root), rng, tiles_per_frame=256, max_tiles=max_tiles)
    dev = {
        k: build_set(v, np.random.default_rng(seed + 1), 32, 1500)
        for k, v in dev_sources(data_root).items()
    }
    prep_s = time.perf_counter() - t0
    net = F.LocalNet(cfg or M.NetConfig())
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    n = len(train_set["s"])
    batch = 32
    deadline = t0 + minutes * 60.0
    budget = max(1.0, deadline - time.perf_counter())
    t_train = time.perf_counter()
    step = 0
    hist = []
    ema = None
    while time.perf_counter() < deadline:
        frac = (time.perf_counter() - t_train) / budget
        for gr in opt.param_groups:
            gr["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        idx = rng.integers(0, n, batch)
        b = {k: torch.from_numpy(v[idx]) for k, v in train_set.items()}
        bits_sum, r = _loss(net, b)
        loss = bits_sum / r
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        if step % 100 == 0:
            hist.append((step, ema))
            if progress:
                progress({"step": step, "loss": ema, "elapsed_s": time.perf_counter() - t0})
    net.eval()
    dev_bits = {k: evaluate(net, v) for k, v in dev.items()}
    info = {
        "seed": seed,
        "minutes": minutes,
        "steps": step,
        "train_tiles": int(n),
        "prep_s": round(prep_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_loss_bits_per_low_bit": round(ema or 0.0, 4),
        "dev_bits_per_low_bit": {k: round(v, 4) for k, v in dev_bits.items()},
        "params": sum(p.numel() for p in net.parameters()),
    }
    save_model(net, out_dir, info)
    return info


ADAPTER_SOURCES = {
    "ct": lambda data: [data / f for f in TRAIN_FILES[:6]],
    "mr": lambda data: (
        [data / f for f in TRAIN_FILES[6:8]]
        + [p for p in train_sources(data) if "mr-epi" in str(p) or "fmri" in str(p)]
    ),
}
ADAPTER_DEV = {"ct": ["CT"], "mr": ["MR-EPI", "MR"]}


def train_adapter(
    data_root: Path,
    model_dir: Path,
    name: str,
    seed: int,
    minutes: float,
    progress: Callable[[dict], None] | None = None,
    r: int = 4,
) -> dict:
    """Fine-tune a LoRA adapter (``peft``) for one modality on top of the model in ``model_dir``.

    Writes ``model_dir/adapters/<name>/`` and rewrites the manifest.  Only the LoRA weights
    train; the base weights stay bit-identical.
    """
    from safetensors.numpy import load_file

    from .adapters import lora_wrap

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = M.NetConfig(**json.loads((model_dir / "config.json").read_text())["net"])
    net = F.LocalNet(cfg)
    net.load_state_dict(
        {k: torch.from_numpy(v) for k, v in load_file(model_dir / "weights.safetensors").items()}
    )
    train_set = build_set(ADAPTER_SOURCES[name](data_root), rng, tiles_per_frame=64, max_tiles=6000)
    devsrc = dev_sources(data_root)
    dev = {
        k: build_set(devsrc[k], np.random.default_rng(seed + 1), 32, 1500)
        for k in ADAPTER_DEV[name]
    }
    net.eval()
    before = {k: evaluate(net, v) for k, v in dev.items()}
    peft_model = lora_wrap(net, r)
    for p_ in net.inp.parameters():
        p_.requires_grad_(False)
    for p_ in net.head.parameters():
        p_.requires_grad_(False)
    params = [p_ for p_ in net.parameters() if p_.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    n = len(train_set["s"])
    deadline = time.perf_counter() + minutes * 60.0
    step = 0
    net.train()
    while time.perf_counter() < deadline:
        idx = rng.integers(0, n, 32)
        b = {k: torch.from_numpy(v[idx]) for k, v in train_set.items()}
        bits_sum, rr = _loss(net, b)
        loss = bits_sum / rr
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if progress and step % 100 == 0:
            progress({"adapter": name, "step": step, "loss": float(loss)})
    net.eval()
    after = {k: evaluate(net, v) for k, v in dev.items()}
    out = model_dir / "adapters" / name
    peft_model.save_pretrained(str(out))
    write_manifest(model_dir)
    info = {
        "adapter": name,
        "seed": seed,
        "minutes": minutes,
        "steps": step,
        "r": r,
        "train_tiles": int(n),
        "wall_s": round(time.perf_counter() - t0, 1),
        "dev_bits_per_low_bit_base": {k: round(v, 4) for k, v in before.items()},
        "dev_bits_per_low_bit_adapter": {k: round(v, 4) for k, v in after.items()},
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=1))
    write_manifest(model_dir)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the local-path model (medzip train local)")
    ap.add_argument("--data", type=Path, default=DEFAULT_TRAINING_DATA)
    ap.add_argument(
        "--out",
        type=Path,
        required=True,
        help="new model folder, e.g. models/local-lm/v2 (released folders are never overwritten)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapter", default=None, help="train this LoRA adapter (ct, mr) on --out")
    ap.add_argument(
        "--quantize-from",
        type=Path,
        default=None,
        help="write the integer model (with its adapters) of this float model folder to --out, "
        "e.g. --quantize-from models/local-lm/v1 --out models/local-lm/v2 (no training)",
    )
    a = ap.parse_args(argv)
    if a.quantize_from is not None:
        from .quantize import quantize_model

        print(json.dumps(quantize_model(a.quantize_from, a.out), indent=1))
        return 0
    torch.set_num_threads(a.threads)
    if a.adapter:
        info = train_adapter(
            a.data,
            a.out,
            a.adapter,
            a.seed,
            a.minutes,
            progress=lambda d: print(json.dumps(d), flush=True),
        )
        print(json.dumps(info, indent=1))
        return 0
    cfg = M.NetConfig(hidden=a.hidden, layers=a.layers, heads=4, intermediate=2 * a.hidden)
    info = train(
        a.data,
        a.out,
        a.seed,
        a.minutes,
        progress=lambda d: print(json.dumps(d), flush=True),
        cfg=cfg,
    )
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
