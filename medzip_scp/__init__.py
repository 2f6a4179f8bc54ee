"""medzip: a lossless DICOM archive node."""

__version__ = "0.1.0"

from pathlib import Path


def shipped_path(name: str) -> Path:
    """Where a file the package ships (``models``, ``alembic``, ``alembic.ini``) is: inside an
    installed wheel (``medzip_scp/_shipped``, put there by ``setup.py``) or, in a checkout,
    at the repository root."""
    package = Path(__file__).resolve().parent
    installed = package / "_shipped" / name
    return installed if installed.exists() else package.parent / name
