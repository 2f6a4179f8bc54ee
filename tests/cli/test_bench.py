"""``medzip bench``: runs the checkout's benchmark scripts with the arguments given."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medzip_scp.cli.main import app


def test_bench_codec_runs_the_codec_benchmark(tmp_path: Path) -> None:
    data = tmp_path / "data" / "conformance"
    data.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), data / "ct.dcm")
    result = CliRunner().invoke(
        app, ["bench", "codec", "--data", str(tmp_path / "data"), "--no-write"]
    )
    assert result.exit_code == 0, result.output
    assert "| codec | CT | encode MPx/s | decode MPx/s |" in result.output
    assert "JPEG-XL lossless effort 9" in result.output
    assert "all round trips exact" in result.output


def test_bench_without_benchmark_scripts_says_where_it_looked(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "ingest", "--benchmarks", str(tmp_path)])
    assert result.exit_code == 2
    assert f"no benchmarks found in {tmp_path}" in result.output
