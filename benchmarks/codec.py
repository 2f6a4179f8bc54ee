"""Codec benchmark: medzip's whole blobs against JPEG-XL, JPEG-LS and JPEG 2000 lossless.

    python benchmarks/codec.py [--data ../shared/data] [--limit N] [--jobs J]
                               [--learned-limit N] [--no-write]

Every lossless-origin DICOM file of ``--data`` (lossy inputs, the deliberately broken
``*_bad`` file and files whose pixels do not decode are skipped) is grouped into a set and
coded as a whole file, as the node stores it:

* **medzip** with the default settings: ``encode_dataset`` (classical paths, candidates
  chosen per frame by the gate, the whole blob decoded once and compared) and
  ``decode_blob``, ``--jobs`` files at once (default: one per CPU), timed by wall clock; as
  the node stores them, the files of a series of two or more code their headers against a
  data set reference (made from the series' first file, its zstd-19 size counted once per
  series, its making timed with the encode);
* **baselines** JPEG-XL lossless effort 9 and 7, JPEG-LS (CharLS) and JPEG 2000 lossless
  (OpenJPEG), via imagecodecs, each frame shifted to start at 0 with its bit depth, plus the
  rest of the file (everything but the pixel data) deflated (zlib level 9): what a store
  of standard codec streams and a compressed header would keep. One thread, per frame.

Encapsulated lossless inputs (JPEG Lossless, JPEG-LS, JPEG 2000, RLE) are decoded with
pydicom and written as native Explicit VR Little Endian files first, so every codec sees
the same pixels (the node itself keeps such files as received, zstd over their fragments:
the series issue recompresses them).

Reports per set: bits per pixel of the whole files (total bytes x 8 / pixels) for each codec,
medzip against the best baseline, the frames where a baseline's own stream is smaller than
medzip's (and by how many bytes in all), medzip's encode and decode MPx/s (wall, ``--jobs``
threads) and per CPU second; the learned path's own rows (``--learned-limit`` files per set,
``LearnedOptions()`` against classical on the same files); the encode and decode CPU time of
one whole 520-frame Enhanced MR. Checks that every round trip is exact. Replaces the
"## Codec" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import sys
import time
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import imagecodecs
import numpy as np
import numpy.typing as npt
import pydicom
import zstandard
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from results_file import write_section  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medzip_scp.codec.api import DEFAULT_LEARNED, DatasetReference  # noqa: E402
from medzip_scp.dicom.blob import (  # noqa: E402
    blob_info,
    dataset_reference,
    decode_blob,
    encode_dataset,
    references_of,
)

LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}
SETS = ("CT", "MR", "MR fMRI 64x64", "MR-EPI", "MR DTI 80x80", "CR/DX", "other")
DTI = "series/mr-dti-enhanced"
_PIXEL_DATA = 0x7FE00010

Frame = npt.NDArray[np.generic]
T = TypeVar("T")
R = TypeVar("R")


def classify(rel: tuple[str, ...], modality: str) -> str:
    if rel[0] == "mr-epi":
        return "MR-EPI"
    if rel[0] == "series":
        return {
            "ct-phantom-1mm": "CT",
            "fmri-ge": "MR fMRI 64x64",
            "mr-dti-enhanced": "MR DTI 80x80",
        }.get(rel[1], "MR")
    if modality in ("CT", "MR"):
        return modality
    if modality in ("CR", "DX"):
        return "CR/DX"
    return "other"


@dataclass
class Item:
    """One file as every codec sees it: native Part-10 bytes, its frames, its header."""

    name: str
    set_name: str
    part10: bytes
    frames: list[Frame]
    header: bytes  # the file without its pixel data value
    transcoded: bool
    series: str  # Series Instance UID ("" when none)

    @property
    def pixels(self) -> int:
        return sum(f.shape[0] * f.shape[1] for f in self.frames)


def load(path: Path, data_root: Path) -> Item | str:
    """The file as an :class:`Item`, or a reason to skip it."""
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
            arr = np.asarray(ds.pixel_array)
            transcoded = ts.is_compressed
            if transcoded:
                ds.decompress(generate_instance_uid=False)
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                part10 = buf.getvalue()
            else:
                part10 = path.read_bytes()
            raw = pydicom.dcmread(io.BytesIO(part10), defer_size=1024)
            elem = raw.get_item(_PIXEL_DATA, keep_deferred=True)
    except Exception as exc:
        return f"does not decode ({type(exc).__name__})"
    start = int(elem.value_tell)
    header = part10[:start] + part10[start + int(elem.length) :]
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1))
    n = int(ds.get("NumberOfFrames", 1) or 1)
    px = arr.reshape(n, rows, cols, spp)
    rel = path.relative_to(data_root).parts
    return Item(
        str(path.relative_to(data_root)),
        classify(rel, str(ds.get("Modality", ""))),
        part10,
        list(px),
        header,
        transcoded,
        str(ds.get("SeriesInstanceUID", "")),
    )


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
    "JPEG-XL e9": (
        lambda a, n: imagecodecs.jpegxl_encode(a, lossless=True, effort=9, bitspersample=n),
        imagecodecs.jpegxl_decode,
    ),
    "JPEG-XL e7": (
        lambda a, n: imagecodecs.jpegxl_encode(a, lossless=True, effort=7, bitspersample=n),
        imagecodecs.jpegxl_decode,
    ),
    "JPEG-LS": (lambda a, n: imagecodecs.jpegls_encode(a), imagecodecs.jpegls_decode),
    "JPEG 2000": (
        lambda a, n: imagecodecs.jpeg2k_encode(a, level=0, reversible=True, bitspersample=n),
        imagecodecs.jpeg2k_decode,
    ),
}
MEDZIP = "medzip"


@dataclass
class Tally:
    bytes_: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    pixels: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    files: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    frames: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    worse_frames: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    worse_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    enc_wall: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    dec_wall: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    enc_cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    dec_cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    base_s: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    paths: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    blob_bytes: dict[str, int] = field(default_factory=dict)  # medzip's blob of each file
    references: dict[str, DatasetReference] = field(default_factory=dict)  # by file name
    inexact: list[str] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    transcoded: int = 0


def _timed_map(fn: Callable[[T], R], inputs: list[T], jobs: int) -> tuple[list[R], float, float]:
    """``fn`` over ``inputs`` on ``jobs`` threads: results, wall seconds, CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(jobs) as pool:
        out = list(pool.map(fn, inputs))
    return out, time.perf_counter() - w, time.process_time() - c


def series_references(items: list[Item], t: Tally) -> int:
    """Make each series' data set reference (series of two or more files, from the first)
    as the node does, into ``t.references``; returns their zstd-19 bytes."""
    first: dict[str, Item] = {}
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        if item.series:
            first.setdefault(item.series, item)
            counts[item.series] += 1
    made = {s: dataset_reference(first[s].part10) for s, n in counts.items() if n >= 2}
    for item in items:
        if item.series in made:
            t.references[item.name] = made[item.series]
    zstd = zstandard.ZstdCompressor(level=19)
    return sum(len(zstd.compress(r.data)) for r in made.values())


def bench_medzip(set_name: str, items: list[Item], jobs: int, t: Tally) -> list[list[int]]:
    """Code the set's files; returns medzip's bytes per frame of each file."""
    w, c = time.perf_counter(), time.process_time()
    t.bytes_[(MEDZIP, set_name)] += series_references(items, t)
    t.enc_wall[set_name] += time.perf_counter() - w
    t.enc_cpu[set_name] += time.process_time() - c

    def encode(item: Item) -> bytes:
        return encode_dataset(item.part10, reference=t.references.get(item.name))

    def decode(pair: tuple[Item, bytes]) -> bytes:
        return decode_blob(pair[1], references_of(t.references.get(pair[0].name)))

    blobs, wall, cpu = _timed_map(encode, items, jobs)
    t.enc_wall[set_name] += wall
    t.enc_cpu[set_name] += cpu
    back, wall, cpu = _timed_map(decode, list(zip(items, blobs, strict=True)), jobs)
    t.dec_wall[set_name] += wall
    t.dec_cpu[set_name] += cpu
    per_frame = []
    for item, blob, restored in zip(items, blobs, back, strict=True):
        if restored != item.part10:
            t.inexact.append(f"{MEDZIP} {item.name}")
        t.bytes_[(MEDZIP, set_name)] += len(blob)
        t.blob_bytes[item.name] = len(blob)
        info = blob_info(blob, references_of(t.references.get(item.name)))
        frames = info["codec"]["frames"] if info["codec"] else []
        for f in frames:
            t.paths[set_name][f["path"]] += 1
        per_frame.append([f["bytes"] for f in frames])
    return per_frame


def bench_baselines(set_name: str, items: list[Item], ours: list[list[int]], t: Tally) -> None:
    for item, our_frames in zip(items, ours, strict=True):
        best_per_frame = [float("inf")] * len(item.frames)
        header = len(zlib.compress(item.header, 9))
        for codec, (enc, dec) in BASELINES.items():
            total = header
            for k, frame in enumerate(item.frames):
                prepared = shifted(frame)
                data = None
                if prepared is not None:
                    values, nbits = prepared
                    try:
                        a = time.perf_counter()
                        data = bytes(enc(values, nbits))
                        t.base_s[(codec, "enc")] += time.perf_counter() - a
                        a = time.perf_counter()
                        back = dec(data)
                        t.base_s[(codec, "dec")] += time.perf_counter() - a
                        t.base_s[(codec, "px")] += values.shape[0] * values.shape[1]
                    except Exception:
                        data = None
                    if data is not None and not np.array_equal(
                        np.asarray(back).reshape(values.shape), values
                    ):
                        t.inexact.append(f"{codec} {item.name}")
                if data is None:  # beyond 16 bits or refused: counted at its raw size
                    t.failed[codec] += 1
                    size = frame.nbytes
                else:
                    size = len(data)
                total += size
                best_per_frame[k] = min(best_per_frame[k], size)
            t.bytes_[(codec, set_name)] += total
        if len(our_frames) == len(item.frames):
            for ours_k, best_k in zip(our_frames, best_per_frame, strict=True):
                t.frames[set_name] += 1
                if ours_k > best_k:
                    t.worse_frames[set_name] += 1
                    t.worse_bytes[set_name] += int(ours_k - best_k)


def whole_file_table(t: Tally) -> str:
    sets = [s for s in SETS if t.pixels[s]]
    codecs = (MEDZIP, *BASELINES)
    lines = [
        "| set | files | MPx | " + " | ".join(codecs) + " | medzip / best baseline "
        "| frames a baseline codes smaller (bytes) | encode MPx/s | decode MPx/s "
        "| encode MPx per CPU s | decode MPx per CPU s |",
        "|---|---:|---:|" + "---:|" * (len(codecs) + 6),
    ]
    rows = [*sets, "all"]
    for s in rows:
        group = sets if s == "all" else [s]
        px = sum(t.pixels[g] for g in group)
        bpp = {c: 8 * sum(t.bytes_[(c, g)] for g in group) / px for c in codecs}
        best = min(bpp[c] for c in BASELINES)
        worse = sum(t.worse_frames[g] for g in group)
        frames = sum(t.frames[g] for g in group)
        worse_b = sum(t.worse_bytes[g] for g in group)

        def rate(d: dict[str, float], group: list[str] = group, px: int = px) -> str:
            seconds = sum(d[g] for g in group)
            return f"{px / 1e6 / seconds:.2f}" if seconds else "-"

        lines.append(
            f"| {s} | {sum(t.files[g] for g in group)} | {px / 1e6:.2f} | "
            + " | ".join(f"{bpp[c]:.3f}" for c in codecs)
            + f" | {bpp[MEDZIP] / best:.4f} | {worse} / {frames} ({worse_b} B) | "
            f"{rate(t.enc_wall)} | {rate(t.dec_wall)} | {rate(t.enc_cpu)} | {rate(t.dec_cpu)} |"
        )
    speed = ", ".join(
        f"{c} {t.base_s[(c, 'px')] / 1e6 / t.base_s[(c, 'enc')]:.2f} / "
        f"{t.base_s[(c, 'px')] / 1e6 / t.base_s[(c, 'dec')]:.2f}"
        for c in BASELINES
        if t.base_s[(c, "enc")]
    )
    paths = "; ".join(
        f"{s}: " + ", ".join(f"{p} {n}" for p, n in sorted(t.paths[s].items(), key=lambda x: -x[1]))
        for s in sets
    )
    lines += [
        "",
        f"Baselines, encode / decode MPx/s, one thread, pixels only: {speed}.",
        "",
        f"Paths medzip chose, frames per set: {paths}.",
    ]
    return "\n".join(lines)


def bench_learned(groups: dict[str, list[Item]], limit: int, t: Tally) -> tuple[str, list[str]]:
    """The learned path's own rows: ``LearnedOptions()`` against classical (the default
    blobs' sizes), same files, same data set references."""
    lines = [
        "| set | files | MPx | classical bpp | learned bpp | learned / classical "
        "| frames split | learned encode MPx/s | learned decode MPx/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    inexact: list[str] = []
    for s in SETS:
        items = groups.get(s, [])[:limit]
        if not items:
            continue
        px = sum(i.pixels for i in items)
        classical = sum(t.blob_bytes[i.name] for i in items)
        learned = 0
        enc = dec = 0.0
        split = frames = 0
        for item in items:
            a = time.perf_counter()
            reference = t.references.get(item.name)
            blob = encode_dataset(item.part10, DEFAULT_LEARNED, reference=reference)
            b = time.perf_counter()
            if decode_blob(blob, references_of(reference)) != item.part10:
                inexact.append(f"learned {item.name}")
            dec += time.perf_counter() - b
            enc += b - a
            learned += len(blob)
            for f in blob_info(blob, references_of(reference))["codec"]["frames"]:
                frames += 1
                split += bool(f["split_planes"])
        lines.append(
            f"| {s} | {len(items)} | {px / 1e6:.2f} | {8 * classical / px:.3f} | "
            f"{8 * learned / px:.3f} | {learned / classical:.4f} | {split} / {frames} | "
            f"{px / 1e6 / enc:.3f} | {px / 1e6 / dec:.3f} |"
        )
    return "\n".join(lines), inexact


def bench_dti(items: Iterable[Item]) -> str:
    """Encode and decode CPU seconds of one whole 520-frame Enhanced MR, default settings."""
    item = next((i for i in items if i.name.startswith(DTI)), None)
    if item is None:
        return "no Enhanced MR object found"
    a = time.process_time()
    blob = encode_dataset(item.part10)
    b = time.process_time()
    assert decode_blob(blob) == item.part10
    c = time.process_time()
    return (
        f"one whole Enhanced MR object ({item.name}, {len(item.frames)} frames of "
        f"{item.frames[0].shape[0]}x{item.frames[0].shape[1]}), default settings, one thread: "
        f"encode {b - a:.1f} s CPU (verification included), decode {c - b:.1f} s CPU, "
        f"{8 * len(blob) / item.pixels:.3f} bpp"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--limit", type=int, default=0, help="at most N files per set (0: all)")
    parser.add_argument(
        "--jobs", type=int, default=len(os.sched_getaffinity(0)), help="medzip threads"
    )
    parser.add_argument(
        "--learned-limit", type=int, default=2, help="files per set for the learned rows (0: none)"
    )
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
    started = time.perf_counter()
    t = Tally()
    groups: dict[str, list[Item]] = defaultdict(list)
    for path in files:
        loaded = load(path, data_root)
        if isinstance(loaded, str):
            t.skipped[loaded] += 1
            continue
        if args.limit and len(groups[loaded.set_name]) >= args.limit:
            continue
        groups[loaded.set_name].append(loaded)
        t.transcoded += loaded.transcoded
    # warm-up (imports, the C core's build, codec initialisation)
    first = next(iter(groups.values()))[0]
    decode_blob(encode_dataset(first.part10))
    interrupted = False
    try:
        for s in SETS:
            items = groups.get(s, [])
            if not items:
                continue
            ours = bench_medzip(s, items, args.jobs, t)
            bench_baselines(s, items, ours, t)
            t.pixels[s] += sum(i.pixels for i in items)
            t.files[s] += len(items)
            print(f"{s}: {len(items)} files", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the table covers the sets finished so far", file=sys.stderr)
    md = whole_file_table(t)
    print(md)
    if interrupted:
        return 130
    dti_line = bench_dti(groups.get("MR DTI 80x80", []))
    print(dti_line, file=sys.stderr)
    learned_md, learned_inexact = ("", [])
    if args.learned_limit:
        learned_md, learned_inexact = bench_learned(groups, args.learned_limit, t)
        print(learned_md)
    t.inexact += learned_inexact
    elapsed = time.perf_counter() - started
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
            f"(shared; run with `nice -n 10`; load average at the end "
            f"{os.getloadavg()[1]:.1f})",
            f"- command: `{cmd}`",
            f"- whole files, bits per pixel (file bytes x 8 / pixels); {exact}; skipped files: "
            f"{skipped}; encapsulated lossless inputs written native first: {t.transcoded}; "
            f"baseline frames not coded (raw size counted): {failed}",
            f"- medzip: default settings (`encode_dataset`, `decode_blob`), {args.jobs} files "
            "at once (threads); encode time includes the one verifying decode; MPx/s by wall "
            "clock, MPx per CPU second over all threads",
            f"- {dti_line}",
            f"- wall time {elapsed:.0f} s",
            "",
            md,
            "",
            f"Learned paths (`LearnedOptions()`), the first {args.learned_limit} files of each "
            "set, against classical on the same files (one thread):",
            "",
            learned_md or "(not run)",
            "",
        ]
    )
    print(exact)
    if not args.no_write:
        write_section("Codec", section)
    return 0 if not t.inexact else 1


if __name__ == "__main__":
    raise SystemExit(main())
