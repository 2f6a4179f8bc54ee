"""Identity payload benchmark: what sealing the patient's identity inside each blob costs.

    python benchmarks/identity.py [--data ../shared/data] [--limit N] [--learned N] [--no-write]

Per data set (folders of ``--data``: ``conformance`` (lossless-origin transfer syntaxes only,
as in ``benchmarks/codec.py``), ``mr-epi``, ``series/ct-phantom-1mm``, ``series/fmri-ge``,
``series/mr-dti-enhanced``, ``series/mr-t1-3d``), each file is coded twice with classical
paths (the node's default):

* without identity: ``encode_dataset(part10)``, the whole object in the blob (codec mzp1);
* with identity: ``seal_instance(part10, keys, policy)``: the identifying elements cut out of
  the stored object and sealed (encrypted and signed) into the payload the codec carries
  (codec mzp2, what background compression writes), with the node's default policy.

Reports per set the sealed payload's size, the identifying elements' raw size, whole-blob
bits per pixel with and without identity, the net bytes per instance (the cut elements leave
the zstd DATASET section, so the net cost is below the payload's size), where the payload
rode (free in pred-v2 frames' coder flushes or by bits-back, inside the frames' coded streams,
or in the PAYLOAD section), and the
speed of sealing, opening (every check) and of ``verify_archive`` on a real archive (SQLite in
a temporary folder: ``Archive.store`` of each file, ``compress_pending`` with the archive's
compressing codec, then ``verify_archive``). ``--learned N`` also codes the first N instances
of each set of at most 1 MPx with the learned paths, with and without identity (slow: minutes
for a 520-frame object); a learned global-path frame carries a payload free by bits-back.
Ctrl-C prints the tables of what was measured so far (RESULTS.md is then left alone).
Replaces the "## Identity payload" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless
from results_file import write_section  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medzip_scp.archive import Archive  # noqa: E402
from medzip_scp.codec.api import LearnedOptions, describe  # noqa: E402
from medzip_scp.config import Settings, StorageSettings  # noqa: E402
from medzip_scp.dicom.blob import encode_dataset  # noqa: E402
from medzip_scp.dicom.part10 import read_received  # noqa: E402
from medzip_scp.identity.instance import (  # noqa: E402
    IdentityPolicy,
    open_instance,
    seal_instance,
)
from medzip_scp.identity.keys import IdentityKeyring  # noqa: E402
from medzip_scp.identity.payload import OVERHEAD  # noqa: E402
from medzip_scp.instance_codecs import identity_policy  # noqa: E402
from medzip_scp.pipeline.compress import compress_pending  # noqa: E402
from medzip_scp.pipeline.verify import verify_archive  # noqa: E402

SETS = {
    "conformance": "conformance",
    "mr-epi": "mr-epi",
    "ct-phantom-1mm": "series/ct-phantom-1mm",
    "fmri-ge": "series/fmri-ge",
    "mr-dti-enhanced": "series/mr-dti-enhanced",
    "mr-t1-3d": "series/mr-t1-3d",
}
LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}
NOT_DICOM = {".py", ".md", ".txt", ".json"}
LEARNED_MAX_PIXELS = 1_000_000  # --learned skips larger objects (a 3.3 MPx one took 8 min)


@dataclass
class Placement:
    """Where a blob's payload rode: free (bits-back, or pred-v2 frames' coder flushes),
    inside the frames' streams, or in the PAYLOAD section."""

    free: int = 0
    in_streams: int = 0
    in_section: int = 0

    @property
    def total(self) -> int:
        return self.free + self.in_streams + self.in_section

    def shares(self) -> str:
        """``streams % / section % / free %`` of the payload bytes."""
        parts = (self.in_streams, self.in_section, self.free)
        return " / ".join(_share(part, self.total) for part in parts)


def placement(blob: bytes) -> Placement:
    info = describe(blob)
    return Placement(
        free=info["payload_free_bytes"],
        in_streams=info["payload_stream_bytes"],
        in_section=info["payload_section_bytes"],
    )


@dataclass
class Tally:
    """One set's measurements: classical paths, the archive run, and ``--learned``."""

    instances: int = 0
    pixels: int = 0
    original_bytes: int = 0
    plain_bytes: int = 0  # blobs without identity
    sealed_bytes: int = 0  # blobs with identity
    payload: list[int] = field(default_factory=list)  # sealed payload bytes per instance
    removed: list[int] = field(default_factory=list)  # raw identifying element bytes
    dataset_saved: int = 0  # DATASET section bytes the cut elements took with them
    placed: Placement = field(default_factory=Placement)
    plain_s: float = 0.0
    seal_s: float = 0.0
    open_s: float = 0.0
    # the archive run
    verified: int = 0
    verified_ok: int = 0
    verified_bytes: int = 0
    verify_s: float = 0.0
    not_archived: list[str] = field(default_factory=list)  # file: why (no value quoted)
    # --learned
    learned: int = 0
    learned_pixels: int = 0
    learned_plain_bytes: int = 0
    learned_sealed_bytes: int = 0
    learned_placed: Placement = field(default_factory=Placement)
    learned_s: float = 0.0


def pixel_count(part10_path: Path) -> tuple[int, str]:
    """``(frames x rows x columns, transfer syntax)`` from the header (0 without pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(part10_path, stop_before_pixels=True)
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if "Rows" not in ds or "Columns" not in ds:
        return 0, syntax
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return frames * int(ds.Rows) * int(ds.Columns), syntax


def set_files(folder: Path, name: str, limit: int) -> list[tuple[Path, int]]:
    """The set's files with their pixel counts (lossless origin only for ``conformance``)."""
    picked = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix in NOT_DICOM or "LICENSE" in path.name:
            continue
        try:
            pixels, syntax = pixel_count(path)
        except Exception:
            continue
        if not pixels or (name == "conformance" and syntax in LOSSY):
            continue
        picked.append((path, pixels))
        if limit and len(picked) >= limit:
            break
    return picked


def measure(
    part10: bytes, pixels: int, keys: IdentityKeyring, policy: IdentityPolicy, t: Tally
) -> None:
    a = time.perf_counter()
    plain = encode_dataset(part10)
    b = time.perf_counter()
    sealed = seal_instance(part10, keys, policy)
    c = time.perf_counter()
    opened = open_instance(sealed, keys, None)
    d = time.perf_counter()
    if opened.part10 != part10:
        raise AssertionError("the sealed instance did not give back the original")
    plain_info, sealed_info = describe(plain), describe(sealed)
    t.instances += 1
    t.pixels += pixels
    t.original_bytes += len(part10)
    t.plain_bytes += len(plain)
    t.sealed_bytes += len(sealed)
    t.payload.append(sealed_info["payload_bytes"])
    t.removed.append(sum(len(value) for _, value in opened.record.removed))
    t.dataset_saved += plain_info["dataset_bytes"] - sealed_info["dataset_bytes"]
    _add(t.placed, placement(sealed))
    t.plain_s += b - a
    t.seal_s += c - b
    t.open_s += d - c


def measure_learned(
    part10: bytes, pixels: int, keys: IdentityKeyring, policy: IdentityPolicy, t: Tally
) -> None:
    a = time.perf_counter()
    plain = encode_dataset(part10, LearnedOptions())
    sealed = seal_instance(part10, keys, policy, LearnedOptions())
    t.learned_s += time.perf_counter() - a
    t.learned += 1
    t.learned_pixels += pixels
    t.learned_plain_bytes += len(plain)
    t.learned_sealed_bytes += len(sealed)
    _add(t.learned_placed, placement(sealed))


def verify_on_archive(files: list[Path], work: Path, t: Tally) -> None:
    """Store ``files`` in a fresh archive, compress (seal) them, time ``verify_archive``."""
    settings = Settings(storage=StorageSettings(data_dir=work / "data"))
    archive = Archive.open(settings)
    for path in files:
        try:
            archive.store(read_received(path), "BENCH")
        except Exception as exc:  # the node would refuse it over the network too
            t.not_archived.append(f"{path.name}: refused ({type(exc).__name__})")
    summary = compress_pending(archive, archive.compressing_codec())
    t.not_archived += [f"{uid}: not compressed" for uid, _ in summary.failures]
    report = verify_archive(archive)
    t.verified = report.checked
    t.verified_ok = report.ok_count
    t.verify_s = report.seconds
    t.verified_bytes = summary.original_bytes


def _rate(count: float, seconds: float, digits: int = 1) -> str:
    return f"{count / seconds:.{digits}f}" if seconds else "-"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "-"


def _add(total: Tally | Placement, part: Tally | Placement) -> None:
    """Add ``part``'s counts, times, lists and placements into ``total``."""
    for f in fields(part):
        mine, theirs = getattr(total, f.name), getattr(part, f.name)
        if isinstance(mine, Placement):
            _add(mine, theirs)
        else:
            setattr(total, f.name, mine + theirs)


def _all(tallies: dict[str, Tally]) -> Tally:
    total = Tally()
    for t in tallies.values():
        _add(total, t)
    return total


def size_table(tallies: dict[str, Tally]) -> str:
    lines = [
        "| set | instances | MPx | payload B mean (min-max) | identifying elements B mean | "
        "bpp without | bpp with | relative cost | net B per instance | DATASET B saved "
        "per instance | payload in frame streams / PAYLOAD section / free |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = {name: t for name, t in tallies.items() if t.instances}
    if len(rows) > 1:
        rows["all"] = _all(rows)
    for name, t in rows.items():
        n = t.instances
        lines.append(
            f"| {name} | {n} | {t.pixels / 1e6:.2f} "
            f"| {statistics.mean(t.payload):.0f} ({min(t.payload)}-{max(t.payload)}) "
            f"| {statistics.mean(t.removed):.0f} "
            f"| {8 * t.plain_bytes / t.pixels:.4f} | {8 * t.sealed_bytes / t.pixels:.4f} "
            f"| {100 * (t.sealed_bytes / t.plain_bytes - 1):+.2f} % "
            f"| {(t.sealed_bytes - t.plain_bytes) / n:.0f} | {t.dataset_saved / n:.0f} "
            f"| {t.placed.shares()} |"
        )
    return "\n".join(lines)


def speed_table(tallies: dict[str, Tally]) -> str:
    lines = [
        "| set | encode without identity inst/s (MPx/s) | seal inst/s (MPx/s) | "
        "open inst/s (MPx/s) | verify on the archive: inst/s (MB/s) | verified OK / archived |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = {name: t for name, t in tallies.items() if t.instances}
    if len(rows) > 1:
        rows["all"] = _all(rows)
    for name, t in rows.items():
        cells = [
            f"{_rate(t.instances, s)} ({_rate(t.pixels / 1e6, s, 2)})"
            for s in (t.plain_s, t.seal_s, t.open_s)
        ]
        verify = (
            f"{_rate(t.verified, t.verify_s)} ({_rate(t.verified_bytes / 1e6, t.verify_s)})"
            if t.verified
            else "-"
        )
        checked = f"{t.verified_ok} / {t.verified}" if t.verified else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verify} | {checked} |")
    return "\n".join(lines)


def learned_table(tallies: dict[str, Tally]) -> str:
    lines = [
        "| set | instances | bpp without | bpp with | relative cost | payload in frame streams "
        "/ PAYLOAD section / free | seconds (both encodes) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in tallies.items():
        if not t.learned:
            continue
        placed = t.learned_placed
        lines.append(
            f"| {name} | {t.learned} | {8 * t.learned_plain_bytes / t.learned_pixels:.4f} "
            f"| {8 * t.learned_sealed_bytes / t.learned_pixels:.4f} "
            f"| {100 * (t.learned_sealed_bytes / t.learned_plain_bytes - 1):+.2f} % "
            f"| {placed.shares()} | {t.learned_s:.0f} |"
        )
    return "\n".join(lines)


def interpretation(tallies: dict[str, Tally]) -> str:
    """What the numbers say, in words (generated, so that a rerun keeps it true)."""
    rows = {name: t for name, t in tallies.items() if t.instances}
    if not rows:
        return "No instance was measured."
    total = _all(rows)

    def cost(t: Tally) -> float:
        return 100 * (t.sealed_bytes / t.plain_bytes - 1)

    ranked = sorted(rows, key=lambda name: cost(rows[name]))
    n = total.instances
    text = (
        f"Sealing the identity into each blob costs {cost(total):+.2f} % over these sets: "
        f"{(total.sealed_bytes - total.plain_bytes) / n:.0f} bytes net per instance for a "
        f"sealed payload of {statistics.mean(total.payload):.0f} bytes. The payload is "
        "ciphertext, which nothing compresses, so each of its bytes costs a byte wherever it "
        "rides, except the bits a pred-v2 frame's arithmetic coder can flush at no cost (any "
        "value of its final interval, 16-31 bits a frame): free share "
        f"{_share(total.placed.free, total.placed.total)}: an object of some dozens of "
        "pred-v2 frames carries its whole payload free, a single-frame image at most 4 bytes. "
        "The "
        "net cost is below the payload's size because the identifying elements it holds "
        f"({statistics.mean(total.removed):.0f} bytes raw per instance) leave the stored data "
        f"set, whose zstd DATASET section shrinks by {total.dataset_saved / n:.0f} bytes per "
        "instance. That cost is nearly the same for every instance, so its share grows as "
        "images shrink: highest for "
        + ", ".join(
            f"{name} ({cost(rows[name]):+.2f} %, "
            f"{rows[name].pixels / rows[name].instances:,.0f} pixels per instance)"
            for name in reversed(ranked[-2:])
        )
        + f", lowest for {ranked[0]} ({cost(rows[ranked[0]]):+.2f} %, "
        f"{rows[ranked[0]].pixels / rows[ranked[0]].instances:,.0f} pixels per instance). "
        f"Sealing took {total.seal_s / total.plain_s:.2f} times as long as coding without "
        "identity (both decode their blob before returning; sealing also opens it again); "
        "opening, every check included, ran at "
        f"{total.pixels / 1e6 / total.open_s:.1f} MPx/s."
    )
    learned = [t for t in rows.values() if t.learned]
    if learned:
        placed = _all({str(i): t for i, t in enumerate(learned)}).learned_placed
        text += (
            " With the learned paths (the instances of the last table) the share carried "
            f"free was {_share(placed.free, placed.total)}: by bits-back a payload rides free only "
            "whole, in one frame whose high part the global path codes and whose bits-back "
            "sampling absorbs at least the payload's length; otherwise as with classical paths."
        )
    return text


def tables(tallies: dict[str, Tally]) -> str:
    parts = [size_table(tallies), "", speed_table(tallies)]
    if any(t.learned for t in tallies.values()):
        parts += ["", "Learned paths (`--learned`):", "", learned_table(tallies)]
    return "\n".join(parts)


def run_set(
    name: str,
    files: list[tuple[Path, int]],
    keys: IdentityKeyring,
    policy: IdentityPolicy,
    learned: int,
    work: Path,
    t: Tally,
) -> None:
    for path, pixels in files:
        measure(path.read_bytes(), pixels, keys, policy, t)
    small = [(path, pixels) for path, pixels in files if pixels <= LEARNED_MAX_PIXELS]
    for path, pixels in small[:learned]:
        measure_learned(path.read_bytes(), pixels, keys, policy, t)
    verify_on_archive([path for path, _ in files], work / name, t)


def main(argv: list[str] | None = None) -> int:
    # Quiet the archive's key file warning, until the end: `medzip bench identity` runs this
    # in the calling process (runpy), which must log as before afterwards (a test suite's
    # later tests lost every medzip_scp warning).
    quiet = logging.getLogger("medzip_scp")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _measure(argv)
    finally:
        quiet.setLevel(level)


def _measure(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--limit", type=int, default=0, help="at most N files per set (0: all)")
    parser.add_argument(
        "--learned",
        type=int,
        default=0,
        help="also code the first N objects of at most 1 MPx of each set with learned paths",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    data_root = args.data.resolve()
    if not data_root.is_dir():
        print(f"data folder not found: {data_root}", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")  # pydicom's warnings about the files' values

    tallies: dict[str, Tally] = {}
    interrupted = False
    warm_up = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medzip-bench-identity-") as tmp:
        work = Path(tmp)
        policy = identity_policy(Settings())  # the node's default: what the archive seals
        keys = IdentityKeyring.open_or_create(work / "keys" / "identity.json")
        # imports and codec initialisation, outside the timings
        measure(warm_up, 1, keys, policy, Tally())
        if args.learned:
            measure_learned(warm_up, 1, keys, policy, Tally())
        try:
            for name, folder in SETS.items():
                if not (data_root / folder).is_dir():
                    print(f"{name:16s} not found under {data_root}, skipped", file=sys.stderr)
                    continue
                files = set_files(data_root / folder, name, args.limit)
                set_started = time.perf_counter()
                tallies[name] = Tally()
                run_set(name, files, keys, policy, args.learned, work, tallies[name])
                t = tallies[name]
                print(
                    f"{name:16s} {t.instances} instances, {t.pixels / 1e6:.2f} MPx, "
                    f"{time.perf_counter() - set_started:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: the tables hold what was measured so far", file=sys.stderr)
    elapsed = time.perf_counter() - started

    md = tables(tallies)
    print(md)
    problems = [
        f"{name}: {t.verified - t.verified_ok} of {t.verified} not OK"
        for name, t in tallies.items()
        if t.verified_ok != t.verified
    ]
    if problems:
        print("VERIFY PROBLEMS: " + "; ".join(problems))
    if interrupted or args.no_write:
        return 1 if problems else 0
    cmd = "python benchmarks/identity.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    not_archived = "; ".join(n for t in tallies.values() for n in t.not_archived) or "none"
    section = "\n".join(
        [
            "## Identity payload",
            "",
            f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: `{' '.join(platform.uname())}`, {os.cpu_count()} CPUs "
            "(shared; run with `nice -n 10`; load average over the last 5 minutes at the end: "
            f"{os.getloadavg()[1]:.1f})",
            f"- command: `{cmd}`"
            + (f" (at most {args.limit} files per set)" if args.limit else " (every file)"),
            "- classical paths (the node's default); conformance: lossless-origin transfer "
            "syntaxes only; RLE, JPEG Lossless and JPEG-LS originals (most of conformance, "
            "mr-epi's `axmb/`, all of mr-t1-3d) are coded as frames where their bytes are "
            "regenerated exactly (`medzip_scp/dicom/recode.py`), other encapsulated objects "
            "(JPEG 2000) are kept whole, without frames, so their payload is in the PAYLOAD "
            "section; payload = the sealed payload "
            "(encrypted identifying elements, UIDs, content hashes; "
            f"{OVERHEAD} bytes of header, tag and signature); bpp = "
            "whole blob bits per pixel (frames x rows x columns); net = blob with identity "
            "minus blob without, per instance",
            "- seal = `seal_instance` (cut, seal, code, decode its own blob and open it "
            "again); open = `open_instance` (every check); verify = `verify_archive` on a "
            "SQLite archive after `Archive.store` and `compress_pending` (MB/s of original "
            f"objects); not archived: {not_archived}; conformance files share "
            "SOP Instance UIDs (one image in several transfer syntaxes), so its archive holds "
            "fewer instances than there are files",
            f"- learned paths: the first {args.learned} instances of at most "
            f"{LEARNED_MAX_PIXELS / 1e6:.0f} MPx of each set (`encode_dataset` and "
            "`seal_instance` with `LearnedOptions()`)"
            if args.learned
            else "- learned paths: not measured (`--learned N` measures them on a few "
            "instances; minutes per instance of several MPx)",
            f"- wall time {elapsed:.0f} s",
            "",
            md,
            "",
            interpretation(tallies),
            "",
        ]
    )
    write_section("Identity payload", section)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
