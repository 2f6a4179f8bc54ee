"""Load the C core of the predictive coder (``_pred.c``) through ctypes.

The core is compiled when the package is installed (``setup.py``: ``pip install .`` or
``pip install -e .``) into ``_pred<extension suffix>`` beside its source; nothing compiles at
run time. A core that is missing, does not load, or was built from another ``_pred.c`` than the
one beside it (a checkout changed after its install) raises :class:`CoreUnavailableError`,
which says how to rebuild it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import threading
from pathlib import Path

_HERE = Path(__file__).parent
_SOURCE = _HERE / "_pred.c"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: CoreUnavailableError | None = None  # a core that failed is not tried again


class CoreUnavailableError(RuntimeError):
    """The C core is not built, does not load, or is stale."""


def _library_path() -> Path:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _HERE / f"_pred{suffix}"
        if candidate.is_file():
            return candidate
    raise CoreUnavailableError(
        f"the predictive coder's C core is not built in {_HERE}: reinstall medzip "
        "(pip install . or, in a checkout, pip install -e .) with a C compiler present"
    )


def _open(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise CoreUnavailableError(
            f"the predictive coder's C core {path} does not load ({exc}): reinstall medzip"
        ) from None
    lib.mz_source_sha256.argtypes = []
    lib.mz_source_sha256.restype = ctypes.c_char_p
    built_from = (lib.mz_source_sha256() or b"").decode()
    if _SOURCE.is_file() and built_from != hashlib.sha256(_SOURCE.read_bytes()).hexdigest():
        raise CoreUnavailableError(
            f"the predictive coder's C core {path.name} was built from another {_SOURCE.name} "
            "than the one beside it: rebuild it (pip install -e . in the checkout)"
        )
    return lib


def load() -> ctypes.CDLL:
    """Return the loaded core library.

    Raises
    ------
    CoreUnavailableError
        If it is not built, does not load or is stale (the message says how to rebuild).
    """
    global _lib, _failed
    with _lock:
        if _lib is not None:
            return _lib
        if _failed is not None:
            raise _failed
        try:
            lib = _open(_library_path())
        except CoreUnavailableError as exc:
            _failed = exc
            raise
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
        lib.mz_state_soften.argtypes = [ptr, c_int]
        lib.mz_state_soften.restype = None
        lib.mz_init.argtypes = []
        lib.mz_init.restype = None
        lib.mz_init()  # constant tables, filled once under the lock
        _lib = lib
        return lib
