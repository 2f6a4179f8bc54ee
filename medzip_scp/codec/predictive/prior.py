"""Priors of the predictive coder: the adaptive model a small frame starts from.

A 64x64 to 128x128 frame is coded before pred-v2's 5,000-odd adaptive contexts have learned
much: it pays for their learning in every frame. A prior is the model state left by coding a
set of training frames (carried from frame to frame, as the frames of one multi-frame object
are), with every probability's count capped (:func:`~medzip_scp.codec.predictive.soften`), so
a frame coded from it starts adapted to images of its kind and still adapts to its own. Frames
coded from a prior are version-3 streams (:func:`~medzip_scp.codec.predictive.encode_frame_carried`
with the prior's state as the start); the blob names the prior's model id and manifest sha256
in its model table, as it names learned models.

Determinism: the prior's file holds the training frames' own streams, not a state. Loading
decodes them in order from a fresh model and caps the counts, all in the C core's integer
arithmetic, so the state is the same on every machine and never depends on a struct's layout
or on the float least-squares fit that chose the streams' coefficients (stored in them).

File (``prior.bin``, little-endian)::

    4   magic b"MZPR"
    1   file version (1)
    2   count cap (1..1000)
    4   n, the number of frames
    n times: 1 bits, 4 rows, 4 columns, 4 length, then a pred-v2 stream of that length
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from . import FRESH, CorruptStreamError, ModelState, decode_frame_carried, encode_frame_carried
from . import soften as soften_state

__all__ = ["PRIOR_FILE", "PredPrior", "encode_prior", "read_prior"]

PRIOR_FILE = "prior.bin"
_MAGIC = b"MZPR"
_HEAD = struct.Struct("<4sBHI")
_FRAME = struct.Struct("<BIII")
_VERSION = 1
_MAX_FRAMES = 100_000


@dataclass(frozen=True, eq=False)
class PredPrior:
    """A loaded prior: the (read-only) model state frames start from.

    Attributes
    ----------
    state
        What :func:`~medzip_scp.codec.predictive.encode_frame_carried` and
        :func:`~medzip_scp.codec.predictive.decode_frame_carried` start from.
    frames
        Training frames it was made from.
    cap
        The count cap applied to it.
    """

    state: ModelState
    frames: int
    cap: int


def encode_prior(frames: Iterable[tuple[npt.NDArray[np.integer], int]], cap: int) -> bytes:
    """The ``prior.bin`` of ``frames`` (each a 2-D array and its bits), coded in order.

    Raises
    ------
    ValueError
        If there are no frames, ``cap`` is outside 1..1000, or a frame is invalid for
        :func:`~medzip_scp.codec.predictive.encode_frame_carried`.
    """
    if not 1 <= cap <= 1000:
        raise ValueError(f"cap must be in 1..1000, got {cap}")
    body = bytearray()
    state = FRESH
    n = 0
    for frame, bits in frames:
        stream, _, state = encode_frame_carried(frame, bits, state)
        rows, columns = frame.shape
        body += _FRAME.pack(bits, rows, columns, len(stream)) + stream
        n += 1
    if n == 0:
        raise ValueError("a prior needs at least one training frame")
    return _HEAD.pack(_MAGIC, _VERSION, cap, n) + bytes(body)


def read_prior(path: Path) -> PredPrior:
    """Load the prior in ``path`` (a ``prior.bin``).

    Raises
    ------
    OSError
        If the file cannot be read.
    CorruptStreamError
        If it is not a prior file of a known version, or a stream in it does not decode.
    """
    data = Path(path).read_bytes()
    if len(data) < _HEAD.size:
        raise CorruptStreamError(f"prior {path}: {len(data)} bytes, too short for its header")
    magic, version, cap, n = _HEAD.unpack_from(data, 0)
    if magic != _MAGIC or version != _VERSION:
        raise CorruptStreamError(
            f"prior {path}: not a prior file of version {_VERSION} "
            f"(magic {magic!r}, version {version})"
        )
    if not 1 <= cap <= 1000 or not 1 <= n <= _MAX_FRAMES:
        raise CorruptStreamError(f"prior {path}: implausible cap {cap} or frame count {n}")
    state = FRESH
    pos = _HEAD.size
    for i in range(n):
        if pos + _FRAME.size > len(data):
            raise CorruptStreamError(f"prior {path}: frame {i} of {n} is cut short")
        bits, rows, columns, length = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        if pos + length > len(data):
            raise CorruptStreamError(f"prior {path}: frame {i} of {n} is cut short")
        _, _, state = decode_frame_carried(data[pos : pos + length], (rows, columns), bits, state)
        pos += length
    if pos != len(data):
        raise CorruptStreamError(f"prior {path}: {len(data) - pos} bytes after its last frame")
    return PredPrior(soften_state(state, cap), n, cap)
