"""Global path: the high bit planes of a frame, coded by a latent-variable model with bits-back ANS.

Model (``global-vae-v2``; ``global-vae-v1`` has the same parameters)
--------------------------------------------------------------------
* **Latent** z: one of K=16 classes per 8x8 block of the high part ``frame >> s``.
* **p(x|z)**: per pixel, a discretised logistic. Its mean is the class's linear causal predictor
  over ``[MED, W, N, NW, NE, WW, NN, NWW, NNW, NNE]`` (integer coefficients, ``2**-12``), its
  scale index ``clip((a_z * lg8(e) + c_z * lg8(e2) + b_z) >> 8, 0, 143)`` on the grid
  ``2**(k/8 - 3)``, where ``lg8`` is an integer 1/8-octave log of a causal gradient energy
  ``e`` and of the neighbours' MED errors ``e2``. Residuals are coded as one of 127 signed
  magnitude buckets (exact up to 15, four per octave above, uniform mantissa bits), from integer
  frequency tables indexed by (scale index, eighth-pixel phase of the mean).
* **p(z)**: a learned categorical (integer counts).
* **q(z|x)**: the model's exact block posterior ``p(z) p(x_b|z) / sum``, computed from integer
  code lengths (1/256 bit) and an integer ``2**(-d/256)`` table. No amortisation gap; no
  encoder network is needed because the posterior is cheap to enumerate (K passes).
* Pixels are coded in the wavefront order ``t = x + 2y`` (every neighbour above satisfies
  ``dx + 2dy < 0``), so each step decodes a whole anti-diagonal in a few batched calls
  (W + 2H steps per frame).

The "network" is this integer kernel (:mod:`.kernel`); there is no float network and torch is
never imported by this package (torch only trains the parameters, :mod:`.train`).

Bits-back and the payload
-------------------------
Encode: the initial stack holds ``[fill words][payload words][0x80000000 | len]`` (top last).
z is *decoded* from it under q(z|x) (consuming payload bits first), then x is encoded under
p(x|z) and z under p(z). Decode reverses this: z under p(z), x under p(x|z), then z is
*encoded* back under q(z|x), which restores the initial words exactly; the payload is parsed
from them and the fill words are checked against the fixed sha256 fill stream. Without a
payload the fill words the sampling consumed are overhead and are in the stream (version 2:
exactly the words it read; version 1: plus under 3 words): bits-back is free only for the part
of a payload the sampling absorbs, :func:`payload_capacity`.

Stream versions and determinism
-------------------------------
The model decides the stream version it writes (``GlobalModel.stream_version``); decoding
reads the version from the stream and needs the model it names (tag = 8 bytes of its weights'
sha256). Formats: :mod:`.coder`.

* **Version 2** (``global-vae-v2``): everything that reaches the entropy coder is an integer
  computed in int64/uint64 from the decoded pixels and the integer tensors of the weights file:
  features, predictions, phase, scale index, table rows, block code lengths, posterior weights,
  the q(z|x) frequency tables (:func:`.fixed.frequency_table`, 24-bit), and the tables
  themselves, which are exact (each ``pmf`` row sums to ``2**24``, the prior to ``2**16``, every
  entry >= 1) and go to the project's own rANS coder (:mod:`..rans`) unchanged. No float, no
  transcendental function, no BLAS, no threads and no third-party coder: the bytes are the same
  on any CPU, thread count, batch split (encode codes the whole frame, decode step by step) and
  library version. The decoder needs numpy and safetensors only.
* **Version 1** (``global-vae-v1``, still decoded): the same integer kernel, but the tables are
  handed to ``constriction``'s float ``Categorical(perfect=False)``, which re-quantises them
  with its own algorithm (its table sums were not exact powers of two), so these streams depend
  on constriction's quantiser (written with 0.5.0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from medzip_scp.codec.errors import CorruptStreamError, IncompatibleLibraryError
from medzip_scp.codec.zoo import DEFAULT_MODELS_ROOT

from . import coder as _coder
from .coder import PayloadTooLargeError
from .model import GlobalModel, ModelNotFoundError, load_model_dir

__all__ = [
    "MODEL_ID",
    "CorruptStreamError",
    "GlobalModel",
    "IncompatibleLibraryError",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "decode_high",
    "encode_high",
    "load_model",
    "payload_capacity",
]

MODEL_ID = "global-vae-v2"


def _model_dir(name: str, root: Path | None) -> Path:
    prefix = "global-vae-"
    if not name.startswith(prefix) or not name[len(prefix) :]:
        raise ModelNotFoundError(name, "is not a global-path model id ('global-vae-<version>')")
    return (root or DEFAULT_MODELS_ROOT) / "global-vae" / name[len(prefix) :]


def load_model(name: str = MODEL_ID, root: Path | None = None) -> GlobalModel:
    """Load ``models/global-vae/<version>/`` and check it against its manifest.

    Raises
    ------
    ModelNotFoundError
        If the model directory, manifest or weights are missing or a sha256 differs.
    """
    return load_model_dir(name, _model_dir(name, root))


def _check(high: npt.NDArray[np.integer], bits_high: int) -> npt.NDArray[np.uint16]:
    if isinstance(bits_high, bool) or not 1 <= int(bits_high) <= 16:
        raise ValueError(f"bits_high must be an integer in 1..16, got {bits_high!r}")
    a = np.asarray(high)
    if a.ndim != 2 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"high must be a non-empty 2-D integer array, got {a.dtype} {a.shape}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= 1 << int(bits_high):
        raise ValueError(
            f"high values must lie in 0..{(1 << int(bits_high)) - 1} for bits_high={bits_high}, "
            f"got {lo}..{hi}"
        )
    return np.ascontiguousarray(a, dtype=np.uint16)


def encode_high(
    high: npt.NDArray[np.uint16],
    bits_high: int,
    model: GlobalModel,
    payload: bytes = b"",
    strict: bool = False,
) -> bytes:
    """Code the high planes of one frame, carrying ``payload`` in the bits-back initial bits.

    Parameters
    ----------
    high
        ``frame >> s``, values in ``[0, 2**bits_high)``.
    bits_high
        ``bits - s`` (1..16).
    model
        From :func:`load_model`.
    payload
        Bytes (meant: the encrypted metadata) to hide. The first ~``payload_capacity`` bytes
        are absorbed by sampling the latents and cost nothing; any excess is stored as is
        (it costs its own size) unless ``strict``.
    strict
        Raise :class:`PayloadTooLargeError` if the payload exceeds the free capacity.

    Returns
    -------
    bytes
        Self-delimiting stream: header, then the ANS words (little-endian uint32).

    Raises
    ------
    ValueError
        Bad input array or bit depth; :class:`PayloadTooLargeError` (a ValueError) for a payload
        over 2**31 - 1 bytes, or over capacity with ``strict``.
    """
    img = _check(high, bits_high)
    return _coder.encode(img, int(bits_high), model, bytes(payload), strict)[0]


def decode_high(
    data: bytes, shape: tuple[int, int], bits_high: int, model: GlobalModel
) -> tuple[npt.NDArray[np.uint16], bytes]:
    """Inverse of :func:`encode_high`: ``(high, payload)``.

    Raises
    ------
    CorruptStreamError
        Truncated or corrupted stream, wrong shape/bits/model, payload words that do not
        parse, fill words that differ from the fill stream, or a CRC-32 mismatch of the values.
    IncompatibleLibraryError
        A version 1 stream and constriction is not installed.
    """
    try:
        return _coder.decode(bytes(data), (int(shape[0]), int(shape[1])), int(bits_high), model)
    except CorruptStreamError:
        raise
    except (ValueError, IndexError, OverflowError) as exc:  # constriction/numpy on garbage
        raise CorruptStreamError(f"global-path stream does not decode ({exc})") from exc


def payload_capacity(high: npt.NDArray[np.uint16], bits_high: int, model: GlobalModel) -> int:
    """Payload bytes that ride for free on this frame (measured with the fill stream).

    The sampling of z consumes ``C`` bits from the initial stack (measured exactly by encoding
    with the fixed fill stream; version 2 counts the information the sampling took from the
    stack, version 1 constriction's ``num_valid_bits``). 32 of them are the length word; a
    64-bit margin covers the variation of ``C`` with the payload's actual bits. Returns
    ``max(0, (C - 96) // 8)``.
    """
    img = _check(high, bits_high)
    stats = _coder.encode(img, int(bits_high), model, b"", False)[1]
    return max(0, (int(stats["consumed_bits"]) - 96) // 8)
