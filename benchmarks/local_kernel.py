"""Integer local-path kernel (local-lm-v2) against the float model it was quantised from (v1).

Usage::

    nice -n 10 .venv/bin/python benchmarks/local_kernel.py [--data ../shared/data] [--frames 2]

For each held-out set (as ``benchmarks/learned_local.py``; frames centre-cropped to 512x512) and
each split ``s`` = 1..4: the ideal code length of the low part under both models (the integer
tables they index), and their relative difference.  Then, on the first frame of each set at
``s = 2``: encode and decode time of both (one torch / one BLAS thread, alternating in one
process so both see the same machine load), wall and CPU seconds, with an exact round-trip check.
Prints markdown; writes nothing.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medzip_scp.codec.learned import bitplanes  # noqa: E402
from medzip_scp.codec.learned import local_path as L  # noqa: E402
from medzip_scp.codec.learned.local_path.train import CR_DX_DEV, read_frames  # noqa: E402


def sets(data: Path, n: int) -> dict[str, list[Path]]:
    epi = sorted(p for p in (data / "mr-epi" / "sag").glob("*/*") if p.is_file())
    return {
        "CT": sorted((data / "series/ct-phantom-1mm").glob("*.dcm"))[10::25][:n],
        "MR-EPI": epi[::4][:n],
        "MR": sorted((data / "series/mr-t1-3d").glob("*.dcm"))[30::30][:n],
        "CR/DX": [data / p for p in CR_DX_DEV][:n],
    }


def crop(a: np.ndarray, side: int = 512) -> np.ndarray:
    h, w = a.shape
    y, x = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return np.ascontiguousarray(a[y : y + side, x : x + side])


def timed(fn, *args):  # noqa: ANN001, ANN002, ANN201
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--frames", type=int, default=2)
    a = ap.parse_args()
    v1, v2 = L.load_model("local-lm-v1"), L.load_model("local-lm-v2")
    print(f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}\n")
    print("| set | frames | s | v1 bpp (low) | v2 bpp (low) | v2 / v1 - 1 |")
    print("|---|---|---|---|---|---|")
    firsts = {}
    for name, paths in sets(a.data, a.frames).items():
        frames = [(crop(f), b) for p in paths for f, b in read_frames(p)[:1]]
        firsts[name] = frames[0]
        npix = sum(f.size for f, _ in frames)
        for s in (1, 2, 3, 4):
            b1 = b2 = 0.0
            for f, bits in frames:
                high, low = bitplanes.split(f, bits, s)
                b1 += L.estimate_bits(low, high, s, bits, v1)
                b2 += L.estimate_bits(low, high, s, bits, v2)
            print(
                f"| {name} | {len(frames)} | {s} | {b1 / npix:.4f} | {b2 / npix:.4f} "
                f"| {100 * (b2 / b1 - 1):+.3f} % |"
            )
    print(
        "\n| set | frame | model | encode s (cpu s) | decode s (cpu s) | MPx/s enc / dec (wall) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (f, bits) in firsts.items():
        high, low = bitplanes.split(f, bits, 2)
        for label, m in (("v1 float", v1), ("v2 int", v2)):
            L.decode_low(
                L.encode_low(low[:32, :32], high[:32, :32], 2, bits, m), high[:32, :32], 2, bits, m
            )
            data, te, ce = timed(L.encode_low, low, high, 2, bits, m)
            out, td, cd = timed(L.decode_low, data, high, 2, bits, m)
            assert np.array_equal(out, low)
            mp = f.size / 1e6
            print(
                f"| {name} | {f.shape[0]}x{f.shape[1]} | {label} | {te:.2f} ({ce:.2f}) "
                f"| {td:.2f} ({cd:.2f}) | {mp / te:.3f} / {mp / td:.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
