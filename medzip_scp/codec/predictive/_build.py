"""Compile and load the C core of the predictive coder (``_pred.c``) through ctypes.

The shared library is built on first use with the system C compiler into a per-user cache
directory, keyed by the sha256 of the source and the compiler flags, so a changed source never
loads a stale binary.  Set ``MEDZIP_PRED_CACHE`` to choose the directory and ``CC`` the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_SOURCE = Path(__file__).with_name("_pred.c")
# -ffp-contract=off and no -ffast-math: the core is integer-only, but keep the flags conservative.
_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-strict-aliasing"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: BuildError | None = None  # a build that failed is not tried again in this process


class BuildError(RuntimeError):
    """The C core could not be compiled or loaded."""


def _cache_dir() -> Path:
    env = os.environ.get("MEDZIP_PRED_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medzip" / "predictive"


def _compile(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BuildError(
            "The predictive coder needs a C compiler to build its core on first use; "
            "none found (set CC or install gcc)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise BuildError(f"Compiling {_SOURCE.name} with {cc} failed:\n{proc.stderr}")
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL:
    """Return the loaded core library, compiling it first if needed."""
    global _lib, _failed
    with _lock:
        if _lib is not None:
            return _lib
        if _failed is not None:
            raise _failed
        digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
        target = _cache_dir() / f"_pred-{digest}-{sys.platform}.so"
        try:
            if not target.exists():
                _compile(target)
            lib = ctypes.CDLL(str(target))
        except (BuildError, OSError) as exc:
            _failed = exc if isinstance(exc, BuildError) else BuildError(f"loading failed: {exc}")
            raise _failed from None
        # pointer arguments are plain addresses (the callers pass contiguous arrays' data)
        ptr, c_int, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.mz_fit.argtypes = [ptr, c_int, c_int, i64, c_int, c_int, c_int, c_int, c_int]
        lib.mz_fit.argtypes += [ptr, ptr, ptr]
        lib.mz_fit.restype = c_int
        lib.mz_encode.argtypes = [c_int, ptr, c_int, c_int, c_int, c_int, c_int, c_int]
        lib.mz_encode.argtypes += [ptr, ptr, ptr, i64, ptr, ptr, ptr]
        lib.mz_encode.restype = i64
        lib.mz_decode.argtypes = [c_int, ptr, i64, c_int, c_int, c_int, c_int, c_int, c_int]
        lib.mz_decode.argtypes += [ptr, ptr, ptr, ptr, ptr, ptr]
        lib.mz_decode.restype = c_int
        lib.mz_state_size.argtypes = []
        lib.mz_state_size.restype = i64
        lib.mz_init.argtypes = []
        lib.mz_init.restype = None
        lib.mz_init()  # constant tables, filled once under the lock
        _lib = lib
        return lib
