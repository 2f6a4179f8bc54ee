"""Series benchmark: the node's whole data directory for each real series, against a store of
standard codec streams with a compressed header per instance.

    python benchmarks/series.py [--data ../shared/data] [--limit N] [--jobs J] [--no-write]

Sets: each folder of ``--data/series`` (``ct-phantom-1mm``, ``fmri-ge``, ``mr-dti-enhanced``,
``mr-t1-3d``) and ``mr-epi``; a set holds one or more series (told by Series Instance UID).
For each set:

* **(a) best classical per-slice store**: every frame coded alone by JPEG-XL lossless effort
  9 and 7, JPEG-LS and JPEG 2000 lossless (as in ``benchmarks/codec.py``, encapsulated inputs
  decoded first), the one codec with the smallest total for the set, plus each instance's
  header (the file without its pixel data) zstd level 19;
* **(b) the node, per instance**: a fresh node (SQLite, temporary folder) that stores every
  file as received (``Archive.store``) and compresses them (``compress_pending``, ``--jobs``
  shards at once, as the node's processes do) with series references off: what the node
  kept before them;
* **the node**: the same with series data set references (the default).

The node's sizes are its whole data directory after compression: the sealed blobs (with the
``refs/`` folder) and the index (SQLite, its write-ahead log checkpointed; not the ``-shm``
memory map), reported apart. Encode is the
compression pass (wall clock, every instance decoded once to verify it); retrieval restores
every instance (``Archive.load_part10``, every check) from a node opened anew (nothing
cached) and compares it with the file byte for byte. Ctrl-C prints the rows of the sets
finished so far (RESULTS.md is then left alone). Replaces the "## Series" section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import zstandard
from codec import BASELINES, load, shifted  # benchmarks/ is on sys.path when run as a script
from results_file import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medzip_scp.archive import Archive  # noqa: E402
from medzip_scp.config import Settings, StorageSettings  # noqa: E402
from medzip_scp.dicom.part10 import dataset_offset_of, read_received  # noqa: E402
from medzip_scp.index.models import Instance  # noqa: E402
from medzip_scp.pipeline.compress import compress_pending  # noqa: E402

SETS = {
    "ct-phantom-1mm": "series/ct-phantom-1mm",
    "fmri-ge": "series/fmri-ge",
    "mr-t1-3d": "series/mr-t1-3d",
    "mr-dti-enhanced": "series/mr-dti-enhanced",
    "mr-epi": "mr-epi",
}
SMALL_MATRIX = {"fmri-ge", "mr-t1-3d", "mr-dti-enhanced"}  # the "small-matrix MR"
NOT_DICOM = {".py", ".md", ".txt", ".json"}


@dataclass
class NodeRun:
    blob_bytes: int = 0  # sealed blobs and refs/, on disk
    reference_bytes: int = 0  # of which refs/
    references: int = 0
    index_bytes: int = 0
    encode_s: float = 0.0
    encode_cpu_s: float = 0.0
    retrieve_s: float = 0.0
    failed: int = 0
    inexact: int = 0

    @property
    def total(self) -> int:
        return self.blob_bytes + self.index_bytes


@dataclass
class SetResult:
    name: str
    series: int = 0
    files: int = 0
    pixels: int = 0
    original_bytes: int = 0
    baseline: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    header_bytes: int = 0  # zstd-19 headers of (a)
    per_instance: NodeRun = field(default_factory=NodeRun)
    node: NodeRun = field(default_factory=NodeRun)

    @property
    def best(self) -> tuple[str, int]:
        """(a): the codec with the smallest pixel total, and its total with the headers."""
        codec = min(self.baseline, key=lambda c: self.baseline[c])
        return codec, self.baseline[codec] + self.header_bytes


def set_files(folder: Path, limit: int) -> list[Path]:
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix not in NOT_DICOM and "LICENSE" not in p.name
    ]
    return files[:limit] if limit else files


def baseline(files: list[Path], data_root: Path, r: SetResult) -> None:
    """(a): each frame coded by each standard codec alone; each header zstd-19."""
    zstd = zstandard.ZstdCompressor(level=19)
    for path in files:
        item = load(path, data_root)
        if isinstance(item, str):
            raise SystemExit(f"{path}: {item}: the series benchmark needs every file")
        r.pixels += item.pixels
        r.header_bytes += len(zstd.compress(item.header))
        for codec, (encode, _decode) in BASELINES.items():
            for frame in item.frames:
                prepared = shifted(frame)
                if prepared is None:
                    r.baseline[codec] += frame.nbytes
                    continue
                values, nbits = prepared
                try:
                    r.baseline[codec] += len(encode(values, nbits))
                except Exception:  # refused: counted at its raw size
                    r.baseline[codec] += frame.nbytes


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def node_run(files: list[Path], work: Path, references: bool, jobs: int, run: NodeRun) -> None:
    """Store ``files`` in a fresh node, compress them, measure its data directory, retrieve."""
    settings = Settings(storage=StorageSettings(data_dir=work / "data"))
    archive = Archive.open(settings)
    if not references:
        archive.SERIES_REFERENCE_MIN_INSTANCES = 1 << 62  # type: ignore[misc]
    for path in files:
        archive.store(read_received(path), "BENCH")
    failures: list[list[tuple[str, str]]] = [[] for _ in range(jobs)]

    def shard(k: int) -> None:
        summary = compress_pending(archive, archive.compressing_codec(), shard=(k, jobs))
        failures[k] = summary.failures

    wall, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=shard, args=(k,)) for k in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.encode_s += time.perf_counter() - wall
    run.encode_cpu_s += time.process_time() - cpu
    run.failed += sum(len(f) for f in failures)
    blob_dir = settings.storage.resolved_blob_dir()
    refs = archive.blobs.references
    run.blob_bytes += _folder_bytes(blob_dir)
    run.reference_bytes += refs.stored_bytes() if refs.folder.exists() else 0
    run.references += refs.count() if refs.folder.exists() else 0
    for sessions in (archive.sessions, archive.read_sessions):
        sessions.kw["bind"].dispose()
    database = settings.storage.data_dir / "index.sqlite3"
    with sqlite3.connect(database) as index:  # the index as it lies at rest, WAL folded in
        index.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    run.index_bytes += sum(
        p.stat().st_size
        for p in settings.storage.data_dir.iterdir()
        if p.is_file() and p.name.startswith("index") and not p.name.endswith("-shm")
    )
    expected = {}
    for path in files:
        raw = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        expected[uid] = raw[dataset_offset_of(raw) :]
    fresh = Archive.open(settings)  # nothing cached: every reference read from refs/
    with fresh.read_sessions() as session:
        rows = list(session.query(Instance).order_by(Instance.id))
        session.expunge_all()
    started = time.perf_counter()
    for row in rows:
        part10 = fresh.load_part10(row)
        if part10[dataset_offset_of(part10) :] != expected.get(row.sop_instance_uid):
            run.inexact += 1
    run.retrieve_s += time.perf_counter() - started


def run_set(name: str, data_root: Path, limit: int, jobs: int) -> SetResult:
    files = set_files(data_root / SETS[name], limit)
    r = SetResult(name, files=len(files))
    series = set()
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            series.add(str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID))
        r.original_bytes += path.stat().st_size
    r.series = len(series)
    baseline(files, data_root, r)
    for references, run in ((False, r.per_instance), (True, r.node)):
        with tempfile.TemporaryDirectory(prefix="medzip-series-") as work:
            node_run(files, Path(work), references, jobs, run)
    return r


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}"


def _rate(mpx: float, seconds: float) -> str:
    return f"{mpx / seconds:.2f}" if seconds else "-"


def table(results: list[SetResult]) -> str:
    lines = [
        "| set | series | files | MPx | (a) best per-slice codec + zstd headers, MB | (b) "
        "node per instance, MB (blobs + index) | node, MB (blobs + index) | of which refs/ "
        "| node / (a) | node blobs / (a) | node / (b) | encode MPx/s | retrieve MPx/s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        codec, a = r.best
        b, n = r.per_instance, r.node
        mpx = r.pixels / 1e6
        lines.append(
            f"| {r.name} | {r.series} | {r.files} | {mpx:.2f} | {_mb(a)} ({codec}) "
            f"| {_mb(b.total)} ({_mb(b.blob_bytes)} + {_mb(b.index_bytes)}) "
            f"| {_mb(n.total)} ({_mb(n.blob_bytes)} + {_mb(n.index_bytes)}) "
            f"| {_mb(n.reference_bytes)} ({n.references}) | {n.total / a:.3f} "
            f"| {n.blob_bytes / a:.3f} | {n.total / b.total:.3f} "
            f"| {_rate(mpx, n.encode_s)} | {_rate(mpx, n.retrieve_s)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--limit", type=int, default=0, help="at most N files per set (0: all)")
    parser.add_argument(
        "--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compression shards"
    )
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    data_root = args.data.resolve()
    if not data_root.is_dir():
        print(f"data folder not found: {data_root}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    results: list[SetResult] = []
    interrupted = False
    try:
        for name in args.sets:
            if not set_files(data_root / SETS[name], 1):
                print(f"{name}: no files under {data_root / SETS[name]}", file=sys.stderr)
                continue
            a = time.perf_counter()
            results.append(run_set(name, data_root, args.limit, args.jobs))
            print(f"{name}: done in {time.perf_counter() - a:.0f} s", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the table covers the sets finished so far", file=sys.stderr)
    md = table(results)
    print(md)
    problems = [
        f"{r.name}: {run.failed} not compressed, {run.inexact} not restored exactly"
        for r in results
        for run in (r.per_instance, r.node)
        if run.failed or run.inexact
    ]
    for line in problems:
        print(line, file=sys.stderr)
    if interrupted or args.no_write:
        return 130 if interrupted else (1 if problems else 0)
    cmd = "python benchmarks/series.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    encode_cpu = {r.name: r.node.encode_cpu_s for r in results}
    section = "\n".join(
        [
            "## Series",
            "",
            f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: `{' '.join(platform.uname())}`, {os.cpu_count()} CPUs (shared; load "
            f"average at the end {os.getloadavg()[1]:.1f})",
            f"- command: `{cmd}`",
            f"- every instance restored exactly: {problems or 'yes'}",
            f"- node: {args.jobs} compression shards (threads); encode = the compression "
            "pass, verification included; retrieve = every instance restored from a node "
            "opened anew; CPU seconds of the encode: "
            + ", ".join(f"{k} {v:.1f}" for k, v in encode_cpu.items()),
            f"- wall time {time.perf_counter() - started:.0f} s",
            "",
            md,
            "",
        ]
    )
    write_section("Series", section)
    return 1 if problems else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
