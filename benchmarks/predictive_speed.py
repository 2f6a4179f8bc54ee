"""Per-core speed and bpp of the predictive coder (pred-v2 alone) on a small subsample.

Usage::

    nice -n 10 .venv/bin/python benchmarks/predictive_speed.py [--data ../shared/data]
        [--repeat N] [--chain]

Sets: 10 slices of ``series/ct-phantom-1mm``, 20 ``mr-epi`` files, 40 frames of one
``mr-dti-enhanced`` object, 30 ``fmri-ge`` files and the 16-bit files of
``conformance/LittleEndianExplicit`` (each sample plane a frame).  Every frame is read with
pydicom (no rescale), signed data shifted by 2**(BitsStored-1).  ``--chain`` codes the frames of
each file (and consecutive files of a set) with the previous frame's fit as the warm-start hint,
as :func:`medzip_scp.codec.api.compress` does for a multi-frame object.  Encode and decode times
are the CPU time of the calling thread (``time.thread_time``, best of ``--repeat`` runs per
frame): per-core speed, steady on a shared machine where wall time is not.  Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medzip_scp.codec import predictive  # noqa: E402


def collect(data: Path) -> dict[str, list[Path]]:
    epi = sorted(p for p in (data / "mr-epi").glob("*/*/*") if p.is_file())
    conf = data / "conformance/LittleEndianExplicit"
    return {
        "CT": sorted((data / "series/ct-phantom-1mm").glob("*.dcm"))[::7][:10],
        "MR-EPI": epi[::2][:20],
        "DTI": sorted((data / "series/mr-dti-enhanced").glob("*.dcm"))[:1],
        "fMRI": sorted(p for p in (data / "series/fmri-ge").rglob("*") if p.is_file())[::10][:30],
        "conf16": [
            conf / n
            for n in (
                "CT_small.dcm",
                "MR_small.dcm",
                "emri_small.dcm",
                "SC_rgb_16bit.dcm",
                "SC_rgb_16bit_2frame.dcm",
            )
        ],
    }


def frames(path: Path, limit: int) -> list[tuple[np.ndarray, int]]:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    bits = int(ds.BitsStored)
    spp = int(ds.get("SamplesPerPixel", 1))
    arr = arr.astype(np.int64)
    if spp > 1:  # (frames,) rows, columns, samples -> one plane per sample
        arr = np.moveaxis(arr.reshape(-1, *arr.shape[-3:]), -1, 1)
    arr = arr.reshape(-1, *arr.shape[-2:])[:limit]
    if int(ds.PixelRepresentation) == 1:
        arr = arr + (1 << (bits - 1))
    return [(np.ascontiguousarray(a, dtype=np.uint16), bits) for a in arr]


def best_time(fn, repeat: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.thread_time()
        out = fn()
        best = min(best, time.thread_time() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--chain", action="store_true", help="warm-start each frame from the last")
    args = ap.parse_args(argv)
    warm = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)
    predictive.decode_frame(predictive.encode_frame(warm, 12), warm.shape, 12)
    print("| set | frames | MPx | bpp | enc MPx/s | dec MPx/s |")
    print("|---|---|---|---|---|---|")
    for name, paths in collect(args.data).items():
        nbytes = npix = nframes = 0
        t_enc = t_dec = 0.0
        hint = None
        for path in paths:
            for frame, bits in frames(path, 40):
                if args.chain:
                    te, (stream, fit) = best_time(
                        lambda f=frame, b=bits, h=hint: predictive.encode_frame_fit(f, b, h),
                        args.repeat,
                    )
                    hint = fit
                else:
                    te, stream = best_time(
                        lambda f=frame, b=bits: predictive.encode_frame(f, b), args.repeat
                    )
                td, out = best_time(
                    lambda s=stream, f=frame, b=bits: predictive.decode_frame(s, f.shape, b),
                    args.repeat,
                )
                if not np.array_equal(out, frame):
                    raise SystemExit(f"round trip failed on {path}")
                t_enc += te
                t_dec += td
                nbytes += len(stream)
                npix += frame.size
                nframes += 1
        print(
            f"| {name} | {nframes} | {npix / 1e6:.2f} | {8 * nbytes / npix:.4f} "
            f"| {npix / t_enc / 1e6:.2f} | {npix / t_dec / 1e6:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
