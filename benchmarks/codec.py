"""Codec benchmark: medzip's pixel codec against JPEG-XL, JPEG-LS and JPEG 2000 lossless.

    python benchmarks/codec.py [--data ../shared/data] [--limit N] [--no-write]

Groups the lossless-origin images of ``--data`` by set (CT, MR-EPI, MR, CR/DX, other; lossy
inputs, the deliberately broken ``*_bad`` file and files that do not decode are skipped), reads
their pixels with pydicom (no rescale) and codes the same frames with

* medzip (``medzip_scp.codec.api.compress``) twice, as whole blobs (container, index,
  per-frame CRCs): with the adaptive learned split (the default: per frame the smallest
  verified of the classical paths and, where the estimate says it can win, a split at s in
  1..4 with pred-v2/global high part and local-path low part), and with classical paths only
  (``learned=None``), so the learned gain is visible;
* JPEG-XL lossless effort 9 and 7, JPEG-LS (CharLS), JPEG 2000 lossless (OpenJPEG), all via
  imagecodecs on each frame shifted to start at 0 with its bit depth (uint8/uint16).

Reports pixel-weighted bits per pixel per set, encode/decode MPx/s over all sets, the share of
frames that chose a split (s > 0), the decode time of a 512x512 CT slice (as chosen, and forced
learned at s = 1), and checks that every round trip is exact. Replaces the "## Codec" section
of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.uid import (
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from results_file import write_section  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medzip_scp.codec.api import (  # noqa: E402
    FrameSet,
    LearnedOptions,
    PixelLayout,
    compress,
    decompress,
    describe,
)

LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}
SETS = ("CT", "MR", "MR-EPI", "CR/DX", "other")
DTI_FRAME_STEP = 26  # mr-dti-enhanced: 520 frames per object, keep every 26th

Frame = npt.NDArray[np.generic]


def classify(path: Path, data_root: Path, modality: str) -> str:
    rel = path.relative_to(data_root).parts
    if rel[0] == "mr-epi":
        return "MR-EPI"
    if rel[0] == "series":
        return "CT" if rel[1] == "ct-phantom-1mm" else "MR"
    if modality == "CT":
        return "CT"
    if modality == "MR":
        return "MR"
    if modality in ("CR", "DX"):
        return "CR/DX"
    return "other"


def load(path: Path, data_root: Path) -> tuple[str, FrameSet] | str:
    """Return (set, frames) or a reason to skip."""
    if path.name.endswith("_bad.dcm"):
        return "deliberately broken"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            ts = ds.file_meta.TransferSyntaxUID
            if ts in LOSSY:
                return "lossy origin"
            if "PixelData" not in ds:
                return "no pixel data"
            arr = ds.pixel_array
    except Exception as exc:
        return f"does not decode ({type(exc).__name__})"
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1))
    n = int(ds.get("NumberOfFrames", 1) or 1)
    ba = int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    px = np.asarray(arr).reshape(n, rows, cols, spp)
    if "mr-dti-enhanced" in str(path):
        px = px[::DTI_FRAME_STEP]
    layout = PixelLayout(rows, cols, spp, ba, int(ds.BitsStored), signed and ba > 1, 0)
    px = px.astype(layout.dtype, copy=False)
    return classify(path, data_root, str(ds.get("Modality", ""))), FrameSet(layout, px)


def shifted(frame: Frame) -> tuple[npt.NDArray[np.unsignedinteger], int] | None:
    """Frame shifted to start at 0 and its bit depth; None beyond 16 bits."""
    v = frame.astype(np.int64)
    v = v - v.min()
    nbits = max(1, int(v.max()).bit_length())
    if nbits > 16:
        return None
    out = v.astype(np.uint8 if nbits <= 8 else np.uint16)
    return (out[..., 0] if out.shape[-1] == 1 else out), nbits


Baseline = tuple[Callable[[np.ndarray, int], bytes], Callable[[bytes], np.ndarray]]
BASELINES: dict[str, Baseline] = {
    "JPEG-XL lossless effort 9": (
        lambda a, n: imagecodecs.jpegxl_encode(a, lossless=True, effort=9, bitspersample=n),
        imagecodecs.jpegxl_decode,
    ),
    "JPEG-XL lossless effort 7": (
        lambda a, n: imagecodecs.jpegxl_encode(a, lossless=True, effort=7, bitspersample=n),
        imagecodecs.jpegxl_decode,
    ),
    "JPEG-LS (CharLS)": (lambda a, n: imagecodecs.jpegls_encode(a), imagecodecs.jpegls_decode),
    "JPEG 2000 lossless (OpenJPEG)": (
        lambda a, n: imagecodecs.jpeg2k_encode(a, level=0, reversible=True, bitspersample=n),
        imagecodecs.jpeg2k_decode,
    ),
}
OURS_BLOB = "medzip, adaptive learned split (whole blob)"
OURS_CLASSICAL = "medzip, classical paths only (whole blob)"
OURS = {OURS_BLOB: {}, OURS_CLASSICAL: {"learned": None}}


class Tally:
    def __init__(self) -> None:
        self.bits: dict[tuple[str, str], float] = defaultdict(float)
        self.pixels: dict[str, int] = defaultdict(int)
        self.files: dict[str, int] = defaultdict(int)
        self.enc_s: dict[str, float] = defaultdict(float)
        self.dec_s: dict[str, float] = defaultdict(float)
        self.timed_px: dict[str, int] = defaultdict(int)
        self.inexact: list[str] = []
        self.failed: dict[str, int] = defaultdict(int)
        self.skipped: dict[str, int] = defaultdict(int)
        self.frames: dict[str, int] = defaultdict(int)
        self.split_frames: dict[str, int] = defaultdict(int)
        self.split_s: dict[int, int] = defaultdict(int)
        self.high_paths: dict[str, int] = defaultdict(int)


def bench_file(name: str, set_name: str, fs: FrameSet, t: Tally) -> None:
    n_px = fs.n_frames * fs.layout.rows * fs.layout.columns
    t.pixels[set_name] += n_px
    t.files[set_name] += 1
    for key, kwargs in OURS.items():
        t0 = time.perf_counter()
        blob = compress(fs, **kwargs)
        t1 = time.perf_counter()
        out = decompress(blob)
        t2 = time.perf_counter()
        if out.frames is None or not np.array_equal(out.frames.pixels, fs.pixels):
            t.inexact.append(f"{key} {name}")
        t.bits[(key, set_name)] += 8 * len(blob)
        t.enc_s[key] += t1 - t0
        t.dec_s[key] += t2 - t1
        t.timed_px[key] += n_px
        if key == OURS_BLOB:
            for f in describe(blob)["frames"]:
                t.frames[set_name] += 1
                if f["split_planes"]:
                    t.split_frames[set_name] += 1
                    t.split_s[f["split_planes"]] += 1
                    t.high_paths[f["path"]] += 1
    for codec, (enc, dec) in BASELINES.items():
        for frame in fs.pixels:
            prepared = shifted(frame)
            if prepared is None:  # beyond 16 bits: counted at its raw size
                t.failed[codec] += 1
                t.bits[(codec, set_name)] += 8 * frame.nbytes
                continue
            values, nbits = prepared
            try:
                a = time.perf_counter()
                data = bytes(enc(values, nbits))
                b = time.perf_counter()
                back = dec(data)
                c = time.perf_counter()
            except Exception:
                t.failed[codec] += 1
                t.bits[(codec, set_name)] += 8 * frame.nbytes
                continue
            if not np.array_equal(np.asarray(back).reshape(values.shape), values):
                t.inexact.append(f"{codec} {name}")
            t.bits[(codec, set_name)] += 8 * len(data)
            t.enc_s[codec] += b - a
            t.dec_s[codec] += c - b
            t.timed_px[codec] += values.shape[0] * values.shape[1]


def table(t: Tally) -> str:
    sets = [s for s in SETS if t.pixels[s]]
    head = "| codec | " + " | ".join(sets) + " | encode MPx/s | decode MPx/s |"
    lines = [head, "|" + "---|" * (len(sets) + 3)]
    for codec in (*OURS, *BASELINES):
        cells = [f"{t.bits[(codec, s)] / t.pixels[s]:.3f}" for s in sets]
        px = t.timed_px[codec] / 1e6
        enc = f"{px / t.enc_s[codec]:.2f}" if t.enc_s[codec] else "-"
        dec = f"{px / t.dec_s[codec]:.2f}" if t.dec_s[codec] else "-"
        lines.append(f"| {codec} | " + " | ".join(cells) + f" | {enc} | {dec} |")
    lines.append(
        "| files / MPx | "
        + " | ".join(f"{t.files[s]} / {t.pixels[s] / 1e6:.2f}" for s in sets)
        + " | | |"
    )
    best = []
    for s in sets:
        ref = min(t.bits[(c, s)] for c in BASELINES)
        best.append(f"{t.bits[(OURS_BLOB, s)] / ref:.4f}")
    lines.append("| medzip learned / best baseline | " + " | ".join(best) + " | | |")
    gain = [f"{t.bits[(OURS_BLOB, s)] / t.bits[(OURS_CLASSICAL, s)]:.4f}" for s in sets]
    lines.append("| medzip learned / medzip classical | " + " | ".join(gain) + " | | |")
    share = [
        f"{t.split_frames[s]} / {t.frames[s]} ({pct:.0f} %)"
        for s in sets
        for pct in [100 * t.split_frames[s] / max(1, t.frames[s])]
    ]
    lines.append("| frames with s > 0 | " + " | ".join(share) + " | | |")
    return "\n".join(lines)


def time_ct_decode(data_root: Path) -> str:
    """Decode time of one 512x512 CT slice: as chosen, and forced learned (s = 1)."""
    files = sorted((data_root / "series" / "ct-phantom-1mm").glob("*"))
    if not files:
        return "no CT series found"
    loaded = load(files[len(files) // 2], data_root)
    if isinstance(loaded, str):
        return loaded
    _, fs = loaded
    parts = []
    for label, opts in (
        ("as chosen", LearnedOptions()),
        ("forced learned s=1 (pred high + local low)", LearnedOptions(force_split=1)),
    ):
        blob = compress(fs, learned=opts)
        best = float("inf")
        for _ in range(2):
            a = time.perf_counter()
            out = decompress(blob)
            best = min(best, time.perf_counter() - a)
        assert out.frames is not None and np.array_equal(out.frames.pixels, fs.pixels)
        split = describe(blob)["frames"][0]["split_planes"]
        parts.append(f"{label} (s={split}, {8 * len(blob) / fs.pixels.size:.3f} bpp): {best:.2f} s")
    shape = f"{fs.layout.rows}x{fs.layout.columns}"
    return f"decode of one {shape} CT slice, best of 2, 1 torch thread: " + "; ".join(parts)


def write_results(section: str) -> None:
    write_section("Codec", section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--limit", type=int, default=0, help="at most N files per set (0: all)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    data_root = args.data.resolve()
    if not data_root.is_dir():
        print(f"data folder not found: {data_root}", file=sys.stderr)
        return 2
    skip_suffix = {".py", ".md", ".txt", ".json"}
    files = sorted(
        p
        for p in data_root.rglob("*")
        if p.is_file() and p.suffix not in skip_suffix and "LICENSE" not in p.name
    )
    # warm-up (imports, codec initialisation)
    warm = np.arange(64 * 64, dtype=np.uint16).reshape(1, 64, 64, 1)
    decompress(compress(FrameSet(PixelLayout(64, 64), warm)))
    decompress(compress(FrameSet(PixelLayout(64, 64), warm), learned=LearnedOptions(force_split=1)))
    for enc, dec in BASELINES.values():
        dec(enc(warm[0, ..., 0], 12))

    t = Tally()
    per_set: dict[str, int] = defaultdict(int)
    started = time.perf_counter()
    for path in files:
        loaded = load(path, data_root)
        if isinstance(loaded, str):
            t.skipped[loaded] += 1
            continue
        set_name, fs = loaded
        if args.limit and per_set[set_name] >= args.limit:
            continue
        per_set[set_name] += 1
        bench_file(str(path.relative_to(data_root)), set_name, fs, t)
        print(f"{set_name:7s} {path.relative_to(data_root)}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    ct_line = time_ct_decode(data_root)
    print(ct_line, file=sys.stderr)
    split_s = ", ".join(f"s={k}: {v}" for k, v in sorted(t.split_s.items())) or "none"
    high = ", ".join(f"{k}: {v}" for k, v in sorted(t.high_paths.items())) or "none"

    md = table(t)
    exact = "all round trips exact" if not t.inexact else f"INEXACT: {t.inexact}"
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(t.skipped.items())) or "none"
    failed = ", ".join(f"{k}: {v} frames" for k, v in t.failed.items()) or "none"
    cmd = "python benchmarks/codec.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    section = "\n".join(
        [
            "## Codec",
            "",
            f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: `{' '.join(platform.uname())}`, {os.cpu_count()} CPUs "
            "(shared; run with `nice -n 10`)",
            f"- command: `{cmd}`",
            f"- bits per pixel, pixel-weighted per set; {exact}; "
            f"skipped files: {skipped}; baseline frames not coded (raw size counted): {failed}",
            "- medzip encode time includes verifying every candidate path by decoding it; "
            "MPx/s are over all sets (single process, 1 torch thread)",
            f"- split frames by s: {split_s}; their high-part path: {high}",
            f"- {ct_line}",
            f"- wall time {elapsed:.0f} s",
            "",
            md,
            "",
            "Which frames are split (rule in `medzip_scp/codec/learned/paths.py`): pred-v2 codes "
            "the high part for s = 1..4; a split survives only if the bytes left for the low "
            "part exceed 0.70 bit per low bit (the local path never did better on held-out "
            "data); the local model's ideal code length on <= 65,536 sampled pixels (tile-row "
            "bands) must promise >= 0.25 % over the best verified classical size; only then are "
            "the high part (pred-v2 and the global path) and the low part coded and decoded for "
            "real, and the split is kept when its verified size, model-table bytes included, is "
            "smaller. Learned encode and decode speed is dominated by the local path "
            "(~0.1 MPx/s on split frames) and by the screen on frames that stay classical.",
            "",
        ]
    )
    print(md)
    print(exact)
    if not args.no_write:
        write_results(section)
    return 0 if not t.inexact else 1


if __name__ == "__main__":
    raise SystemExit(main())
