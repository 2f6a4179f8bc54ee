"""Benchmark the learned global path against pred-v2 on the same high planes.

Usage::

    nice -n 10 .venv/bin/python benchmarks/learned_global.py [--data ../shared/data] \
        [--stride N] [--crop N] [--splits 0,1,2,4]

For each dev set (held out from training: CT ct-phantom-1mm, MR-EPI mr-epi/ax, MR mr-t1-3d,
CR/DX lossless-origin conformance files) and each split s, every frame's ``high = frame >> s``
(``bitplanes.split``) is coded by the global path (no payload: the fill words are in the bytes)
and by pred-v2 with ``bits - s`` bits. Columns:

* ``global bpp``: real bytes of the global path, no payload, per pixel;
* ``net bpp``: (bytes with a random payload of ``payload_capacity`` bytes - payload bytes) per
  pixel, i.e. the cost of the image when the frame carries its capacity of metadata;
* ``pred-v2 bpp``: real bytes of pred-v2 on the same high array;
* ``payload B/frame``: mean ``payload_capacity`` (bytes that ride free);
* encode/decode MPx/s of the global path (single process, after a warm-up; encode includes the
  posterior, decode includes the bits-back re-encode and the payload check).

Every stream is decoded and compared (values and payload). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medzip_scp.codec.learned.bitplanes import split  # noqa: E402
from medzip_scp.codec.learned.global_path import (  # noqa: E402
    coder as _coder,
)
from medzip_scp.codec.learned.global_path import (  # noqa: E402
    decode_high,
    encode_high,
    load_model,
)
from medzip_scp.codec.learned.global_path.train import dev_files, read_frames  # noqa: E402
from medzip_scp.codec.predictive import encode_frame  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--stride", type=int, default=1, help="every N-th file of a set")
    ap.add_argument("--crop", type=int, default=0, help="crop frames to N x N (0: none)")
    ap.add_argument("--splits", default="0,1,2,4")
    ap.add_argument("--sets", default="CT,MR-EPI,MR,CR/DX", help="comma-separated dev sets")
    ap.add_argument("--jxl", action="store_true", help="also JPEG-XL e9 on the same high part")
    ap.add_argument(
        "--model",
        default=None,
        help="model directory (default: the shipped model the global path codes with)",
    )
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"data folder {args.data} not found", file=sys.stderr)
        return 2
    if args.model:
        from medzip_scp.codec.learned.global_path.model import load_model_dir

        model = load_model_dir("global-vae-dev", Path(args.model))
    else:
        model = load_model()
    splits = [int(s) for s in args.splits.split(",")]
    warm = np.random.default_rng(0).integers(0, 4096, (32, 32)).astype(np.uint16)
    decode_high(encode_high(warm, 12, model), warm.shape, 12, model)
    rng = np.random.default_rng(1)
    rows = []
    for name, paths in dev_files(args.data).items():
        if name not in args.sets.split(","):
            continue
        frames = []
        for p in paths[:: args.stride if name in ("CT", "MR") else 1]:
            for f, bits in read_frames(p):
                if args.crop:
                    f = np.ascontiguousarray(f[: args.crop, : args.crop])
                frames.append((f, bits))
        for s in splits:
            g = net = pv = jx = 0
            cap_total = 0
            npix = nfr = 0
            t_enc = t_dec = 0.0
            for f, bits in frames:
                if bits - s < 1:
                    continue
                high, _ = split(f, bits, s)
                hb = bits - s
                t0 = time.perf_counter()
                stream, stats = _coder.encode(high, hb, model, b"", False)
                t1 = time.perf_counter()
                out, pl = decode_high(stream, high.shape, hb, model)
                t2 = time.perf_counter()
                if not np.array_equal(out, high) or pl != b"":
                    raise SystemExit(f"round trip failed: {name} s={s}")
                # payload_capacity() without a second encode: the same accounting
                cap = max(0, (int(stats["consumed_bits"]) - 96) // 8)
                payload = rng.integers(0, 256, cap, dtype=np.uint8).tobytes()
                s2 = encode_high(high, hb, model, payload)
                out2, pl2 = decode_high(s2, high.shape, hb, model)
                if not np.array_equal(out2, high) or pl2 != payload:
                    raise SystemExit(f"payload round trip failed: {name} s={s}")
                t_enc += t1 - t0
                t_dec += t2 - t1
                g += len(stream)
                net += len(s2) - cap
                cap_total += cap
                pv += len(encode_frame(high, hb))
                if args.jxl:
                    jin = high.astype(np.uint8) if hb <= 8 else high
                    jx += len(
                        imagecodecs.jpegxl_encode(jin, lossless=True, effort=9, bitspersample=hb)
                    )
                npix += high.size
                nfr += 1
            if not nfr:
                continue
            rows.append(
                (
                    name,
                    s,
                    nfr,
                    8 * g / npix,
                    8 * net / npix,
                    8 * pv / npix,
                    8 * jx / npix,
                    cap_total / nfr,
                    npix / t_enc / 1e6,
                    npix / t_dec / 1e6,
                )
            )
            print(f"# {name} s={s} done: {rows[-1]}", file=sys.stderr, flush=True)
    print(
        f"\nmachine: {platform.machine()}, python {platform.python_version()}, "
        f"model {model.model_id} sha256 {model.sha256[:16]}"
    )
    print(
        "\n| set | s | frames | global bpp | net bpp (carrying payload) | pred-v2 bpp | "
        "JPEG-XL e9 bpp | global / pred-v2 | payload B/frame | enc MPx/s | dec MPx/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s, nfr, gb, nb, pb, jb, cap, enc, dec in rows:
        jxl = f"{jb:.3f}" if jb else "-"
        print(
            f"| {name} | {s} | {nfr} | {gb:.3f} | {nb:.3f} | {pb:.3f} | {jxl} | {gb / pb:.3f} | "
            f"{cap:.0f} | {enc:.2f} | {dec:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
