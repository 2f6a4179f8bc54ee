"""Encode/decode speed of two global-path models on the same frames, interleaved.

Usage::

    nice -n 10 .venv/bin/python benchmarks/learned_global_speed.py [--data ../shared/data] \
        [--models global-vae-v1,global-vae-v2]

Every 23rd CT file, every 4th MR-EPI and every 16th MR file of the dev sets, first frame, split
planes s = 0 and 2: each model encodes and decodes the same high part in the same process, the
order alternating per frame, so machine load affects both alike. Every stream is decoded and
compared. Prints MPx/s per set and model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medzip_scp.codec.learned.bitplanes import split  # noqa: E402
from medzip_scp.codec.learned.global_path import decode_high, encode_high, load_model  # noqa: E402
from medzip_scp.codec.learned.global_path.train import dev_files, read_frames  # noqa: E402

STRIDE = {"CT": 23, "MR-EPI": 4, "MR": 16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--models", default="global-vae-v1,global-vae-v2")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"data folder {args.data} not found", file=sys.stderr)
        return 2
    models = {name: load_model(name) for name in args.models.split(",")}
    sets = dev_files(args.data)
    for name, stride in STRIDE.items():
        acc = {k: [0.0, 0.0, 0] for k in models}
        files = sets[name][::stride]
        for i, p in enumerate(files):
            for f, bits in read_frames(p)[:1]:
                for s in (0, 2):
                    high, _ = split(f, bits, s)
                    order = list(models) if (i + s) % 2 == 0 else list(models)[::-1]
                    for k in order:
                        t0 = time.perf_counter()
                        data = encode_high(high, bits - s, models[k])
                        t1 = time.perf_counter()
                        out, _ = decode_high(data, high.shape, bits - s, models[k])
                        t2 = time.perf_counter()
                        if not np.array_equal(out, high):
                            raise SystemExit(f"round trip failed: {p} s={s} {k}")
                        acc[k][0] += t1 - t0
                        acc[k][1] += t2 - t1
                        acc[k][2] += high.size
        cols = " | ".join(
            f"{k} enc {a[2] / a[0] / 1e6:.2f} dec {a[2] / a[1] / 1e6:.2f} MPx/s"
            for k, a in acc.items()
        )
        print(f"| {name} | {len(files)} frames x s=0,2 | {cols} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
