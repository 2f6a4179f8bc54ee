"""An installed wheel works outside the checkout: the C core is built at install time (nothing
compiles at run time), the models and migrations ship inside the package."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.data_paths import PYDICOM_FILES, REPO_ROOT
from tests.net.conftest import free_port

pytestmark = pytest.mark.slow

# Run by the installed package: learned paths forced, so the models must come from the wheel.
_CODE_WITH_A_LEARNED_MODEL = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import medzip_scp
    from medzip_scp.codec.api import LearnedOptions, describe
    from medzip_scp.codec.zoo import DEFAULT_MODELS_ROOT
    from medzip_scp.dicom.blob import decode_blob, encode_dataset

    site = Path(sys.argv[1])
    assert Path(medzip_scp.__file__).is_relative_to(site), medzip_scp.__file__
    assert DEFAULT_MODELS_ROOT.is_relative_to(site), DEFAULT_MODELS_ROOT
    original = Path(sys.argv[2]).read_bytes()
    blob = encode_dataset(original, LearnedOptions(force_split=2))
    assert decode_blob(blob) == original
    models = {m["id"] for m in describe(blob)["models"]}
    print("models:", ",".join(sorted(models)))
    """
)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_an_installed_wheel_codes_and_serves_outside_the_checkout(tmp_path: Path) -> None:
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDZIP_")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # the venv's setuptools builds it (no build isolation: no download)
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO_ROOT)],
         elsewhere, env)  # fmt: skip
    (wheel,) = wheels.glob("medzip_scp-*.whl")
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], elsewhere, env)
    assert list((site / "medzip_scp" / "codec" / "predictive").glob("_pred.*.so"))

    # the installed package, not the checkout, and no compiler to fall back on
    env = {**env, "PYTHONPATH": str(site), "CC": "/bin/false", "PATH": "/usr/bin:/bin"}
    image = PYDICOM_FILES / "CT_small.dcm"
    out = _run([sys.executable, "-c", _CODE_WITH_A_LEARNED_MODEL, str(site), str(image)],
               elsewhere, env)  # fmt: skip
    assert "models: local-lm-v2" in out

    port = free_port()
    node = subprocess.Popen(
        [str(site / "bin" / "medzip"), "serve", "--port", str(port), "--data-dir", "archive"],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert node.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("ready")):
            line = node.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
        assert lines and lines[-1].startswith("ready"), "\n".join(lines)
        stored = subprocess.run(
            ["/usr/bin/storescu", "-aec", "MEDZIP", "127.0.0.1", str(port), str(image)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stored.returncode == 0, stored.stderr
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
    assert node.returncode == 0
    assert (elsewhere / "archive" / "index.sqlite3").is_file()  # migrated from the wheel
