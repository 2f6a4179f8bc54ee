"""fsync of a file or a folder: what every durable write of the store ends with."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path, flags: int = 0) -> None:
    """fsync a file, or a folder with ``flags=os.O_DIRECTORY`` (its entries)."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
