"""Benchmark the learned local path (low ``s`` planes given the high part) on held-out series.

Usage::

    nice -n 10 .venv/bin/python benchmarks/learned_local.py [--data ../shared/data] [--s 1,2,3,4]
        [--stride N] [--max-side 1024] [--adapter NAME] [--threads 1]

Sets (all held out from training, split by series): CT ``series/ct-phantom-1mm``, MR-EPI
``mr-epi/sag`` and ``mr-epi/axmb``, MR ``series/mr-t1-3d``, CR/DX the four lossless-origin
conformance files of ``benchmarks/predictive.py``.  Frames larger than ``--max-side`` are centre
cropped (the same pixels go to every codec).  For each frame and split ``s`` it measures real
bytes of: pred-v2 on the whole frame (s = 0); pred-v2 on the high part (bits - s) plus the local
path on the low part; pred-v2 on the high part plus pred-v2 on the low part as its own ``s``-bit
frame; JPEG-XL effort 9 on the whole frame.  "adaptive" picks per frame the smallest of s = 0 and
every split (what a per-frame choice by measured cost gets).  Decode speed of the local path is
timed (perf_counter, after a warm-up) on the first frame of each set, with an exact round trip
check.  Prints markdown; writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medzip_scp.codec.learned import bitplanes  # noqa: E402
from medzip_scp.codec.learned import local_path as L  # noqa: E402
from medzip_scp.codec.learned.local_path.train import CR_DX_DEV, read_frames  # noqa: E402
from medzip_scp.codec.predictive import encode_frame  # noqa: E402


def collect(data: Path, stride: int) -> dict[str, list[Path]]:
    epi = sorted(
        p for d in ("sag", "axmb") for p in (data / "mr-epi" / d).glob("*/*") if p.is_file()
    )
    return {
        "CT": sorted((data / "series/ct-phantom-1mm").glob("*.dcm"))[::stride],
        "MR-EPI": epi[:: max(1, stride // 2)],
        "MR": sorted((data / "series/mr-t1-3d").glob("*.dcm"))[::stride],
        "CR/DX": [data / p for p in CR_DX_DEV],
    }


def _bpp(nbytes: int, npix: int) -> float:
    return 8.0 * nbytes / npix


def crop(a: np.ndarray, side: int) -> np.ndarray:
    h, w = a.shape
    y, x = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return np.ascontiguousarray(a[y : y + side, x : x + side])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--s", default="1,2,3,4")
    ap.add_argument("--stride", type=int, default=10)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import imagecodecs

    torch.set_num_threads(a.threads)
    svals = [int(v) for v in a.s.split(",")]
    model = L.load_model(adapter=a.adapter)
    print(
        f"model {model.model_id} (manifest sha256 {model.sha256.hex()[:16]}), adapter "
        f"{a.adapter or '-'}; {platform.processor() or platform.machine()}, torch threads "
        f"{a.threads}; s = {svals}; stride {a.stride}; max side {a.max_side}\n"
    )
    for name, paths in collect(a.data, a.stride).items():
        rows = {k: 0 for k in ["s0", "jxl"] + [f"{w}{s}" for s in svals for w in ("L", "P", "H")]}
        lowbits = {s: [0, 0] for s in svals}  # local, pred-v2 low
        adaptive = 0
        npix = 0
        nfr = 0
        speed: dict[int, float] = {}
        for p in paths:
            for frame, bits in read_frames(p):
                frame = crop(frame, a.max_side)
                n = frame.size
                npix += n
                nfr += 1
                s0 = len(encode_frame(frame, bits))
                rows["s0"] += s0
                rows["jxl"] += len(
                    imagecodecs.jpegxl_encode(frame, lossless=True, effort=9, bitspersample=bits)
                )
                best = s0
                for s in svals:
                    if s >= bits:
                        rows[f"L{s}"] += s0
                        rows[f"P{s}"] += s0
                        continue
                    high, low = bitplanes.split(frame, bits, s)
                    hb = len(encode_frame(high, bits - s))
                    lb = len(L.encode_low(low, high, s, bits, model))
                    pb = len(encode_frame(low, s))
                    rows[f"H{s}"] += hb
                    rows[f"L{s}"] += hb + lb
                    rows[f"P{s}"] += hb + pb
                    lowbits[s][0] += lb
                    lowbits[s][1] += pb
                    best = min(best, hb + lb, hb + pb)
                    if s not in speed:
                        data = L.encode_low(low, high, s, bits, model)
                        L.decode_low(data, high, s, bits, model)  # warm-up
                        t = time.perf_counter()
                        out = L.decode_low(data, high, s, bits, model)
                        dt = time.perf_counter() - t
                        assert np.array_equal(out, low), "local path round trip failed"
                        speed[s] = n / dt / 1e6
                adaptive += best
        bpp = functools.partial(_bpp, npix=npix)
        print(f"### {name}: {len(paths)} files, {nfr} frames, {npix / 1e6:.2f} MPx\n")
        print(
            f"s = 0 (pred-v2 whole frame): **{bpp(rows['s0']):.3f}** bpp; JPEG-XL e9 "
            f"{bpp(rows['jxl']):.3f}; adaptive best per frame {bpp(adaptive):.3f}\n"
        )
        print(
            "| s | pred-v2 high + local low | pred-v2 high + pred-v2 low | pred-v2 high alone "
            "| low part: local | low part: pred-v2 | local decode MPx/s |"
        )
        print("|---|---|---|---|---|---|---|")
        for s in svals:
            print(
                f"| {s} | {bpp(rows[f'L{s}']):.3f} | {bpp(rows[f'P{s}']):.3f} | "
                f"{bpp(rows[f'H{s}']):.3f} | {bpp(lowbits[s][0]):.3f} | {bpp(lowbits[s][1]):.3f} | "
                f"{speed.get(s, float('nan')):.2f} |"
            )
        print()
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
