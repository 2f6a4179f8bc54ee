"""Where the tests find real DICOM: ../shared/data (see its README) and pydicom's own files."""

from __future__ import annotations

from pathlib import Path

import pydicom.data

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()
PYDICOM_FILES = Path(pydicom.data.__file__).resolve().parent / "test_files"
