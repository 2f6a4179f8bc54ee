"""The candidate gate: size and encode time of the gated default against trying every path.

    nice -n 10 python benchmarks/gate.py [--data ../shared/data]

Codes each set's lossless-origin frames (subsampled, see ``SETS``; lossy inputs, the
deliberately broken ``*_bad`` file, files that do not decode and conformance files whose
pixels repeat another file's are skipped) as whole classical blobs (``learned=None``) three
ways:

* ``old``: the candidates tried before the gate, ``pred``, ``jpegxl`` (effort 7), ``jpegls``,
  ``zstd`` on every frame;
* ``gated``: the default, ``pred`` and ``jpegls`` plus what :mod:`medzip_scp.codec.gate` adds;
* ``all``: every candidate on every frame (``pred``, JPEG-XL effort 7 and 9, JPEG-LS,
  JPEG 2000, zstd), the best the classical codec can do.

Prints, per set, bits per pixel of the three, ``gated`` relative to ``all``, the frames where
``gated`` is larger than ``all`` and by how much at most, the paths ``gated`` chose, and the
encode time (single process; each includes verifying every candidate by decoding it). Checks
that every ``gated`` blob decodes to its frames exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medzip_scp.codec.api import FrameSet, PixelLayout, compress, decompress, describe  # noqa: E402

LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}
OLD = ("pred", "jpegxl", "jpegls", "zstd")
ALL = ("pred", "jpegxl", "jpegxl-e9", "jpegls", "jpeg2000", "zstd")
# set name: (folder under the data root, every n-th file, at most this many frames per file)
SETS: dict[str, tuple[str, int, int | None]] = {
    "conformance lossless": ("conformance", 1, None),
    "mr-epi": ("mr-epi", 3, None),
    "ct-phantom-1mm": ("series/ct-phantom-1mm", 5, None),
    "fmri-ge": ("series/fmri-ge", 5, None),
    "mr-t1-3d": ("series/mr-t1-3d", 3, None),
    "mr-dti-enhanced": ("series/mr-dti-enhanced", 1, 40),
}


@dataclass
class Tally:
    pixels: int = 0
    frames: int = 0
    files: int = 0
    bytes: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    worse_frames: int = 0
    worst_excess: float = 0.0
    chosen: Counter[str] = field(default_factory=Counter)


def frame_sets(folder: Path, step: int, max_frames: int | None) -> Iterator[FrameSet]:
    seen: set[str] = set()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "LICENSE" not in p.name)
    for path in files[::step]:
        if path.name.endswith("_bad.dcm"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                if ds.file_meta.TransferSyntaxUID in LOSSY or "PixelData" not in ds:
                    continue
                arr = np.asarray(ds.pixel_array)
            except Exception:  # a file that does not decode is not part of the comparison
                continue
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1))
        n = int(ds.get("NumberOfFrames", 1) or 1)
        ba = int(ds.BitsAllocated)
        signed = int(ds.get("PixelRepresentation", 0)) == 1 and ba > 1
        layout = PixelLayout(rows, cols, spp, ba, int(ds.BitsStored), signed, 0)
        px = arr.reshape(n, rows, cols, spp)[:max_frames].astype(layout.dtype, copy=False)
        digest = hashlib.sha256(px.tobytes() + str(px.shape).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        yield FrameSet(layout, px)


def bench(fs: FrameSet, t: Tally) -> None:
    blobs = {}
    for key, paths in (("old", OLD), ("gated", None), ("all", ALL)):
        start = time.perf_counter()
        blobs[key] = compress(fs, paths=paths, learned=None)
        t.seconds[key] += time.perf_counter() - start
        t.bytes[key] += len(blobs[key])
    back = decompress(blobs["gated"]).frames
    if back is None or not np.array_equal(back.pixels, fs.pixels):
        raise SystemExit("gated blob did not decode to its frames exactly")
    gated = describe(blobs["gated"])["frames"]
    best = describe(blobs["all"])["frames"]
    for g, b in zip(gated, best, strict=True):
        t.chosen[g["path"]] += 1
        if g["bytes"] > b["bytes"]:
            t.worse_frames += 1
            t.worst_excess = max(t.worst_excess, g["bytes"] / b["bytes"] - 1)
    t.pixels += fs.n_frames * fs.layout.rows * fs.layout.columns
    t.frames += fs.n_frames
    t.files += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args(argv)
    root = args.data.resolve()
    if not root.is_dir():
        print(f"data folder not found: {root}; pass --data", file=sys.stderr)
        return 2
    warm = np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64, 1)  # imports, codec set-up
    compress(FrameSet(PixelLayout(64, 64), warm), paths=ALL, learned=None)
    print(
        "| set | files / frames | MPx | bpp old | bpp gated | bpp all | gated / all "
        "| frames gated > all (max excess) | encode s old | encode s gated | gated / old time "
        "| encode s all | gated chose |"
    )
    print("|" + "---|" * 13)
    total = Tally()
    for name, (folder, step, max_frames) in SETS.items():
        t = Tally()
        for fs in frame_sets(root / folder, step, max_frames):
            bench(fs, t)
        if not t.files:
            continue
        bpp = {k: 8 * t.bytes[k] / t.pixels for k in ("old", "gated", "all")}
        chose = ", ".join(f"{k} {v}" for k, v in t.chosen.most_common())
        print(
            f"| {name} | {t.files} / {t.frames} | {t.pixels / 1e6:.2f} | {bpp['old']:.4f} "
            f"| {bpp['gated']:.4f} | {bpp['all']:.4f} | {t.bytes['gated'] / t.bytes['all']:.4f} "
            f"| {t.worse_frames} ({100 * t.worst_excess:.2f} %) | {t.seconds['old']:.1f} "
            f"| {t.seconds['gated']:.1f} | {t.seconds['gated'] / t.seconds['old']:.2f} "
            f"| {t.seconds['all']:.1f} | {chose} |",
            flush=True,
        )
        total.seconds.update(t.seconds)
    print(
        f"\nencode time over all sets: old {total.seconds['old']:.1f} s, gated "
        f"{total.seconds['gated']:.1f} s ({total.seconds['gated'] / total.seconds['old']:.2f}x), "
        f"all {total.seconds['all']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
