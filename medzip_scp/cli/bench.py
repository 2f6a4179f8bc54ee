"""``medzip bench``: the benchmarks of the source checkout (``benchmarks/``), by name.

The benchmark scripts need the repository around them (``../shared/data``, DCMTK's
``storescu``, the ``benchmarks/RESULTS.md`` they update), so they are not part of the
installed package; this command finds them next to the package of an editable install (or
under ``--benchmarks``) and runs them with the arguments that follow.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Annotated

import typer

import medzip_scp

BENCHMARKS = {
    "codec": "codec.py",
    "ingest": "ingest.py",
    "identity": "identity.py",
    "series": "series.py",
}

bench_app = typer.Typer(no_args_is_help=True)


def _benchmarks_dir(explicit: Path | None) -> Path:
    folder = explicit or Path(medzip_scp.__file__).resolve().parents[1] / "benchmarks"
    if not (folder / BENCHMARKS["codec"]).is_file():
        typer.echo(
            f"no benchmarks found in {folder}: `medzip bench` runs the scripts of a source "
            "checkout (pip install -e .) or of the folder given with --benchmarks",
            err=True,
        )
        raise typer.Exit(2)
    return folder


def _run(script: str, folder: Path | None, args: list[str]) -> None:
    path = _benchmarks_dir(folder) / script
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path


BenchDirOption = Annotated[
    Path | None, typer.Option("--benchmarks", help="Folder holding the benchmark scripts.")
]
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@bench_app.command("codec", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_codec(ctx: typer.Context, benchmarks: BenchDirOption = None) -> None:
    """Bits per pixel and MPx/s against JPEG-XL, JPEG-LS and JPEG 2000.

    Runs benchmarks/codec.py with the options that follow (--limit N, --no-write, --help).
    """
    _run(BENCHMARKS["codec"], benchmarks, ctx.args)


@bench_app.command("ingest", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_ingest(ctx: typer.Context, benchmarks: BenchDirOption = None) -> None:
    """C-STORE instances per second against a bare SCP.

    Runs benchmarks/ingest.py with the options that follow (--count N, --associations 1 4,
    --no-write, --help).
    """
    _run(BENCHMARKS["ingest"], benchmarks, ctx.args)


@bench_app.command("identity", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_identity(ctx: typer.Context, benchmarks: BenchDirOption = None) -> None:
    """What sealing the patient's identity in each blob costs: bytes, bits per pixel, speed.

    Runs benchmarks/identity.py with the options that follow (--limit N, --learned N,
    --no-write, --help).
    """
    _run(BENCHMARKS["identity"], benchmarks, ctx.args)


@bench_app.command("series", context_settings=_PASS_THROUGH, add_help_option=False)
def bench_series(ctx: typer.Context, benchmarks: BenchDirOption = None) -> None:
    """The node's data directory per series set against per-slice standard codecs.

    Runs benchmarks/series.py with the options that follow (--sets NAME ..., --limit N,
    --no-write, --help).
    """
    _run(BENCHMARKS["series"], benchmarks, ctx.args)
