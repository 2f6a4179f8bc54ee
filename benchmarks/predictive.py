"""Benchmark the predictive per-frame coder against JPEG-XL, JPEG-LS and JPEG 2000 lossless.

Usage::

    .venv/bin/python benchmarks/predictive.py [--data ../shared/data] [--stride N] [--crop N]

For each set (CT, MR-EPI, MR, CR/DX) every frame is read with pydicom (no rescale), signed data
is shifted by 2**(BitsStored-1), and the same uint16 pixels go to every codec in the same run.
bpp is pixel-weighted over the set and computed from the real bytes; encode/decode speeds are
single-core wall time (perf_counter, after a warm-up).  Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medzip_scp.codec.predictive import CODER_ID, decode_frame, encode_frame  # noqa: E402

CR_DX = [
    "conformance/JPEG2000Lossless/966_fixed.dcm",
    "conformance/JPEG2000Lossless/JPEG2KLossless_1s_1f_u_16_16.dcm",
    "conformance/JPEG2000Lossless/NM_Kakadu44_SOTmarkerincons.dcm",
    "conformance/JPEGLSLossless/RG2_JLSL.dcm",
]


def collect(data: Path, stride: int) -> dict[str, list[Path]]:
    epi = sorted(p for p in (data / "mr-epi").glob("*/*/*") if p.is_file())
    return {
        "CT": sorted((data / "series/ct-phantom-1mm").glob("*.dcm"))[::stride],
        "MR-EPI": epi[::stride],
        "MR": sorted((data / "series/mr-t1-3d").glob("*.dcm"))[::stride],
        "CR/DX": [data / p for p in CR_DX],
    }


def frames(path: Path) -> list[tuple[np.ndarray, int]]:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    bits = int(ds.BitsStored)
    arr = arr.reshape((-1, *arr.shape[-2:])).astype(np.int64)
    if int(ds.PixelRepresentation) == 1:
        arr = arr + (1 << (bits - 1))
    return [(np.ascontiguousarray(a, dtype=np.uint16), bits) for a in arr]


def reference_sizes(frame: np.ndarray, bits: int) -> dict[str, int]:
    import imagecodecs

    return {
        "JPEG-XL e9": len(
            imagecodecs.jpegxl_encode(frame, lossless=True, effort=9, bitspersample=bits)
        ),
        "JPEG-XL e7": len(
            imagecodecs.jpegxl_encode(frame, lossless=True, effort=7, bitspersample=bits)
        ),
        "JPEG-LS": len(imagecodecs.jpegls_encode(frame)),
        "JPEG 2000": len(
            imagecodecs.jpeg2k_encode(frame, level=0, reversible=True, bitspersample=bits)
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--stride", type=int, default=1, help="use every N-th file of a series")
    ap.add_argument("--crop", type=int, default=0, help="crop frames to N x N (0: no crop)")
    ap.add_argument("--no-reference", action="store_true", help="skip the other codecs")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"data folder {args.data} not found", file=sys.stderr)
        return 2

    warm = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)
    decode_frame(encode_frame(warm, 12), warm.shape, 12)

    codecs = ["medzip " + CODER_ID, "JPEG-XL e9", "JPEG-XL e7", "JPEG-LS", "JPEG 2000"]
    rows = []
    for name, paths in collect(args.data, args.stride).items():
        size = dict.fromkeys(codecs, 0)
        npix = 0
        t_enc = t_dec = 0.0
        nframes = 0
        for path in paths:
            for frame, bits in frames(path):
                if args.crop:
                    frame = np.ascontiguousarray(frame[: args.crop, : args.crop])
                t0 = time.perf_counter()
                stream = encode_frame(frame, bits)
                t1 = time.perf_counter()
                out = decode_frame(stream, frame.shape, bits)
                t2 = time.perf_counter()
                if not np.array_equal(out, frame):
                    raise SystemExit(f"round trip failed on {path}")
                t_enc += t1 - t0
                t_dec += t2 - t1
                size[codecs[0]] += len(stream)
                if not args.no_reference:
                    for k, v in reference_sizes(frame, bits).items():
                        size[k] += v
                npix += frame.size
                nframes += 1
        bpp = {k: 8 * v / npix for k, v in size.items()}
        best = min((v for k, v in bpp.items() if k != codecs[0] and v > 0), default=float("nan"))
        rows.append((name, nframes, npix, bpp, best, npix / t_enc / 1e6, npix / t_dec / 1e6))
        print(f"# {name}: {nframes} frames done", file=sys.stderr, flush=True)

    print(
        f"\nmachine: {platform.machine()} {platform.processor() or ''}, python "
        f"{platform.python_version()}, single thread, stride {args.stride}"
        + (f", crop {args.crop}" if args.crop else "")
    )
    print()
    print(
        "| set | frames | MPx | "
        + " | ".join(codecs)
        + " | ours / best other | enc MPx/s | dec MPx/s |"
    )
    print("|---|---|---|" + "---|" * len(codecs) + "---|---|---|")
    for name, nframes, npix, bpp, best, enc, dec in rows:
        cells = " | ".join(f"{bpp[c]:.3f}" for c in codecs)
        print(
            f"| {name} | {nframes} | {npix / 1e6:.2f} | {cells} | {bpp[codecs[0]] / best:.4f} "
            f"| {enc:.2f} | {dec:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
