"""Ingest benchmark: C-STORE throughput of the medzip node against a bare pynetdicom SCP.

    python benchmarks/ingest.py [--count 1000] [--associations 1 4] [--rounds 3] [--no-write]

Generates ``--count`` 512x512 16-bit CT instances (copies of a real slice from
``../shared/data/series/ct-phantom-1mm`` with new SOP Instance and Series UIDs), then sends
them with DCMTK's ``/usr/bin/storescu`` over 1 association and over N parallel associations
(N storescu processes on disjoint parts) to

* the medzip node (``medzip serve`` in a subprocess, default configuration: one process per
  core; SQLite in a temporary data directory, and PostgreSQL in a fresh schema when
  ``MEDZIP_BENCH_PG_URL`` / the default test URL is reachable): acknowledges only after
  blob fsync and index commit. The node's background compression worker runs during the
  measurement (as in production); more SQLite runs with ``MEDZIP_PIPELINE__COMPRESS=false``
  and with ``--processes 1`` isolate the C-STORE path and the effect of processes;
* a bare pynetdicom storage SCP (a subprocess) that writes each received data set to a file,
  without fsync.

Every node run follows a bare SCP run with the same association count (this machine's
speed drifts by tens of percent within minutes, so runs minutes apart do not compare): the
default node ``--rounds`` times per association count, each variant once. The table gives
each target's median rate and range, and its share of the bare rate as the median of its
pairs' ratios.

Prints a markdown table and replaces the "## Ingest" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from results_file import write_section  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "series" / "ct-phantom-1mm" / "I1000.dcm"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
PG_URL = os.environ.get(
    "MEDZIP_BENCH_PG_URL",
    os.environ.get("MEDZIP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
)

BARE_SCP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    out = Path(sys.argv[2])
    def on_store(event):
        # what a bare SCP does: write the received data set as a Part-10 file, no fsync
        with open(out / event.request.AffectedSOPInstanceUID, "wb") as fh:
            fh.write(b"\\x00" * 128 + b"DICM")
            from pydicom.filewriter import write_file_meta_info
            write_file_meta_info(fh, event.file_meta, enforce_standard=False)
            fh.write(event.request.DataSet.getvalue())
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_associations = 32
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                    evt_handlers=[(evt.EVT_C_STORE, on_store)])
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def generate(count: int, folder: Path) -> list[Path]:
    """``count`` copies of one real CT slice, each with a new SOP Instance UID; one new
    Series Instance UID for the whole set."""
    ds = pydicom.dcmread(SOURCE)
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    paths = []
    for i in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        path = folder / f"ct{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_for_echo(port: int, aet: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        rc = subprocess.run(
            [ECHOSCU, "-aec", aet, "127.0.0.1", str(port)], capture_output=True
        ).returncode
        if rc == 0:
            return
        time.sleep(0.3)
    raise RuntimeError("server did not answer C-ECHO")


def send(port: int, aet: str, files: list[Path], associations: int) -> float:
    """Seconds for ``associations`` storescu processes to send disjoint parts of ``files``."""
    parts = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aec", aet, "-aet", f"BENCH{i}", "127.0.0.1", str(port), *map(str, part)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i, part in enumerate(parts)
    ]
    outputs = [p.communicate()[0].decode(errors="replace") for p in procs]
    elapsed = time.perf_counter() - t0
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0 or "E:" in out:
            raise RuntimeError(f"storescu failed ({p.returncode}):\n{out[-2000:]}")
    return elapsed


@dataclass
class Row:
    target: str
    associations: int
    instances: int
    seconds: float
    reference: float | None = None  # rate of the bare SCP run just before this one

    @property
    def rate(self) -> float:
        return self.instances / self.seconds


def pg_schema_url() -> tuple[str, str] | None:  # (url, schema)
    """A fresh schema on the PostgreSQL server, or None when it is unreachable."""
    try:
        import psycopg
        from sqlalchemy.engine import make_url
    except ImportError:
        return None
    url = make_url(PG_URL)
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"medzip_bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(libpq, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except Exception as exc:
        print(f"PostgreSQL not reachable, skipped ({type(exc).__name__})", file=sys.stderr)
        return None
    full = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return full.render_as_string(hide_password=False), schema


def drop_schema(schema: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    libpq = make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def run_once(
    name: str, start: callable, aet: str, files: list[Path], n: int, tmp: Path, run: int
) -> Row:
    """Start a fresh server, send ``files`` over ``n`` associations, stop it."""
    work = tmp / re.sub(r"[^\w-]+", "_", f"{run}-{name}-{n}")
    work.mkdir()
    port = free_port()
    proc = start(port, work)
    try:
        wait_for_echo(port, aet, proc)
        seconds = send(port, aet, files, n)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    row = Row(name, n, len(files), seconds)
    print(f"{name:<36} {n} assoc: {len(files)} in {seconds:.1f} s = {row.rate:.1f}/s", flush=True)
    return row


def start_bare(script: Path) -> callable:
    def start(port: int, work: Path) -> subprocess.Popen:
        out = work / "received"
        out.mkdir()
        return subprocess.Popen(
            [sys.executable, str(script), str(port), str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return start


def start_medzip(
    database_url: str | None, compress: bool = True, processes: int | None = None
) -> callable:
    medzip = str(Path(sys.executable).with_name("medzip"))

    def start(port: int, work: Path) -> subprocess.Popen:
        env = dict(os.environ, MEDZIP_LOG_LEVEL="WARNING")
        if database_url:
            env["MEDZIP_STORAGE__DATABASE_URL"] = database_url
        if not compress:
            env["MEDZIP_PIPELINE__COMPRESS"] = "false"
        out = work / "medzip.out"
        proc = subprocess.Popen(
            [medzip, "serve", "--data-dir", str(work / "data"), "--port", str(port)]
            + ([] if processes is None else ["--processes", str(processes)]),
            env=env,
            stdout=open(out, "w"),  # noqa: SIM115
            stderr=open(work / "medzip.log", "w"),  # noqa: SIM115
        )
        # "ready" is printed once every node process listens (before that, the kernel
        # gives all connections on the shared port to the processes already listening)
        deadline = time.monotonic() + 120
        while "\nready" not in out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"medzip serve did not get ready: see {work}")
            time.sleep(0.2)
        return proc

    return start


BARE = "bare pynetdicom SCP"
NODE = "medzip (SQLite)"


def table(rows: list[Row]) -> str:
    """One line per target and association count: median rate and range over its runs, and
    its share of the bare SCP's rate, the median of its runs' ratios to the bare SCP run
    just before each."""
    runs: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        runs.setdefault((r.target, r.associations), []).append(r)
    lines = [
        "| target | associations | runs | instances/s (median) | range | % of bare SCP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (target, n), group in runs.items():
        rates = [r.rate for r in group]
        paired = [r.rate / r.reference for r in group if r.reference]
        if target == BARE:
            share = "100 %"
        else:
            share = f"{100 * statistics.median(paired):.0f} %" if paired else "-"
        lines.append(
            f"| {target} | {n} | {len(group)} | {statistics.median(rates):.1f} | "
            f"{min(rates):.0f}-{max(rates):.0f} | {share} |"
        )
    return "\n".join(lines)


def write_results(section: str) -> None:
    write_section("Ingest", section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns of bare SCP and node per association count"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--no-pg", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()
    if not Path(STORESCU).exists() or not SOURCE.exists():
        sys.exit(f"needs {STORESCU} (DCMTK) and {SOURCE}")

    with tempfile.TemporaryDirectory(prefix="medzip-bench-") as tmp_text:
        tmp = Path(tmp_text)
        (tmp / "files").mkdir()
        files = generate(args.count, tmp / "files")
        script = tmp / "bare_scp.py"
        script.write_text(BARE_SCP)
        rows: list[Row] = []

        def paired(name: str, start: callable, n: int) -> None:
            """A bare SCP run, then the node's run, which it is the reference of."""
            bare = run_once(BARE, start_bare(script), "BARE", files, n, tmp, len(rows))
            node = run_once(name, start, "MEDZIP", files, n, tmp, len(rows) + 1)
            node.reference = bare.rate
            rows.extend([bare, node])

        for _round in range(args.rounds):
            for n in args.associations:
                paired(NODE, start_medzip(None), n)
        for n in args.associations:
            paired("medzip (SQLite, no bg compression)", start_medzip(None, compress=False), n)
        for n in [n for n in args.associations if n > 1]:
            paired("medzip (SQLite, 1 process)", start_medzip(None, processes=1), n)
        for n in [] if args.no_pg else args.associations:
            pg = pg_schema_url()  # a fresh schema per run: the same UIDs are sent again
            if pg is None:
                break
            url, schema = pg
            try:
                paired("medzip (PostgreSQL)", start_medzip(url), n)
            finally:
                drop_schema(schema)

    command = "python benchmarks/ingest.py " + shlex.join(sys.argv[1:])
    section = "\n".join(
        [
            "## Ingest",
            "",
            f"C-STORE of {args.count} copies of a 512x512 16-bit CT slice "
            f"({SOURCE.stat().st_size // 1024} KiB, Explicit VR Little Endian) with DCMTK "
            "`storescu`, N parallel associations on disjoint parts. The bare SCP writes each "
            "data set to a file without fsync; medzip acknowledges only after blob fsync "
            "and index commit. Target: medzip at least 80 % of the bare SCP's rate. Every "
            "node run followed a bare SCP run with the same association count, and its share "
            f"is the median of those pairs' ratios: the default node {args.rounds} times per "
            "association count, each variant once.",
            "",
            table(rows),
            "",
            f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            f"- machine: `{' '.join(platform.uname())}`, nproc {os.cpu_count()}",
            f"- command: `{command.strip()}`",
            "",
        ]
    )
    print()
    print(table(rows))
    if not args.no_write:
        write_results(section)


if __name__ == "__main__":
    main()
