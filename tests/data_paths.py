"""Where the tests find real DICOM: ../shared/data (see its README) and pydicom's own files."""

from __future__ import annotations

from pathlib import Path

import pydicom.data

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()
PYDICOM_FILES = Path(pydicom.data.__file__).resolve().parent / "test_files"
NO_SHARED_DATA = f"real DICOM data not found at {SHARED_DATA} (see ../shared/data/README.md)"


def part10_files(root: Path) -> list[Path]:
    """The DICOM Part 10 files (a preamble, then ``DICM``) under ``root``, sorted; none when
    ``root`` is absent."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.stat().st_size > 132:
            with open(path, "rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    found.append(path)
    return found
