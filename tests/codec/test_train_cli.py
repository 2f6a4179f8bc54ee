"""``medzip train``: refuses to overwrite released models; help works without torch."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medzip_scp.cli.train import train_app
from medzip_scp.codec.zoo import DEFAULT_MODELS_ROOT

runner = CliRunner()


@pytest.mark.parametrize(
    ("kind", "folder"),
    [("local", "local-lm/v1"), ("global", "global-vae/v1"), ("prior", "pred-prior/v1")],
)
def test_refuses_released_model_folder(kind: str, folder: str, tmp_path: Path) -> None:
    out = DEFAULT_MODELS_ROOT / folder
    before = sorted(p.name for p in out.iterdir()) if out.exists() else []
    result = runner.invoke(train_app, [kind, "--out", str(out), "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "released model" in result.output
    after = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert before == after


def test_refuses_folder_with_a_manifest(tmp_path: Path) -> None:
    out = tmp_path / "v9"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    result = runner.invoke(train_app, ["global", "--out", str(out), "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "already holds a model" in result.output


def test_help_lists_both_commands() -> None:
    result = runner.invoke(train_app, ["--help"])
    assert result.exit_code == 0
    assert all(kind in result.output for kind in ("local", "global", "prior"))


def test_global_model_is_named_after_its_version_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from medzip_scp.codec.learned.global_path.model import load_model_dir
    from medzip_scp.codec.learned.global_path.train import train

    data = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data}")
    out = tmp_path / "global-vae" / "v7"
    summary = train(data, out, steps=2, n_crops=40, minutes=1)
    assert summary["model_id"] == "global-vae-v7"
    assert load_model_dir("global-vae-v7", out).sha256 == summary["sha256"]


@pytest.mark.parametrize(("kind", "folder"), [("local", "local-lm"), ("global", "global-vae")])
def test_quantize_from_rebuilds_the_released_integer_model(
    kind: str, folder: str, tmp_path: Path
) -> None:
    out = tmp_path / folder / "v2"  # the global model's id comes from the folder names
    args = [kind, "--quantize-from", str(DEFAULT_MODELS_ROOT / folder / "v1"), "--out", str(out)]
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 0, result.output
    released = DEFAULT_MODELS_ROOT / folder / "v2" / "manifest.json"
    assert (out / "manifest.json").read_bytes() == released.read_bytes()
    again = CliRunner().invoke(train_app, args)
    assert again.exit_code == 2 and "already holds a model" in again.output
