"""``medzip bench``: runs the checkout's benchmark scripts with the arguments given."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
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
    whole, learned = _tables(result.output)
    assert whole["set"][3:8] == ["medzip", "JPEG-XL e9", "JPEG-XL e7", "JPEG-LS", "JPEG 2000"]
    ct = whole["CT"]
    assert ct[1:3] == ["1", "0.02"]  # CT_small: 128 x 128
    medzip, *baselines = (float(v) for v in ct[3:8])
    assert float(ct[8]) == pytest.approx(medzip / min(baselines), abs=1e-3)  # rounded bpp
    assert ct[9].startswith("0 / 1")  # no frame a baseline codes smaller
    assert float(learned["CT"][5]) <= 1.0  # learned never above classical
    assert "all round trips exact" in result.output


def _tables(output: str) -> list[dict[str, list[str]]]:
    """The markdown tables in ``output``: per table, its cells by first cell ("set" for the
    header), separator lines left out."""
    tables: list[dict[str, list[str]]] = []
    previous = ""
    for line in output.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            if not previous.startswith("|"):
                tables.append({})
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            tables[-1][cells[0]] = cells
        previous = line
    return tables


def test_bench_identity_reports_each_set_with_and_without_identity(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for folder, name in (("conformance", "CT_small.dcm"), ("series/fmri-ge", "MR_small.dcm")):
        (data / folder).mkdir(parents=True)
        shutil.copy(get_testdata_file(name), data / folder / name)
    result = CliRunner().invoke(
        app, ["bench", "identity", "--data", str(data), "--limit", "1", "--no-write"]
    )
    assert result.exit_code == 0, result.output
    sizes, speeds = _tables(result.output)
    assert list(sizes) == list(speeds) == ["set", "conformance", "fmri-ge", "all"]
    assert sizes["set"][5:9] == ["bpp without", "bpp with", "relative cost", "net B per instance"]
    assert all(len(row) == len(sizes["set"]) for row in sizes.values())
    assert all(len(row) == len(speeds["set"]) for row in speeds.values())
    for name in ("conformance", "fmri-ge"):
        assert sizes[name][1] == "1"  # --limit 1
        assert float(sizes[name][6]) > float(sizes[name][5])  # the payload costs bits
        # classical paths, one frame: at most its coder flush's 4 bytes (of a payload of
        # about 400) ride free
        shares = [float(share.strip(" %")) for share in sizes[name][-1].split("/")]
        assert sum(shares) == pytest.approx(100, abs=1.5) and shares[2] <= 1.1
        assert speeds[name][-1] == "1 / 1"  # verified OK on a real archive
    assert sizes["all"][1] == "2"


def test_bench_without_benchmark_scripts_says_where_it_looked(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "ingest", "--benchmarks", str(tmp_path)])
    assert result.exit_code == 2
    assert f"no benchmarks found in {tmp_path}" in result.output


def test_bench_series_compares_the_node_with_per_slice_codecs(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "series" / "fmri-ge"
    folder.mkdir(parents=True)
    slices = dcmread(get_testdata_file("MR_small.dcm"))
    for n in range(3):  # one series of three slices
        slices.SOPInstanceUID = generate_uid()
        slices.InstanceNumber = n + 1
        slices.save_as(folder / f"{n}.dcm")
    result = CliRunner().invoke(
        app, ["bench", "series", "--data", str(tmp_path / "data"), "--no-write"]
    )
    assert result.exit_code == 0, result.output  # every instance restored exactly
    [table] = _tables(result.output)
    assert list(table) == ["set", "fmri-ge"]
    row = dict(zip(table["set"], table["fmri-ge"], strict=True))
    assert (row["series"], row["files"]) == ("1", "3")
    assert row["of which refs/"].endswith("(1)")  # one reference for the series
    assert float(row["node / (b)"]) < 1.0  # its blobs hold the headers' differences only
    for other in ("ct-phantom-1mm", "mr-epi"):
        assert f"{other}: no files under" in result.output
