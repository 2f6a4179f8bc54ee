"""The global-path model: integer parameters, integer probability tables, loading and hashing.

Everything that reaches the entropy coder is an integer stored in the weights file, so the
decoder never evaluates a float network or a transcendental function (see the package
docstring for the determinism argument).

Parameters (``weights.safetensors``, all ``int32``)
---------------------------------------------------
``coef``      (K, NF)       fixed-point (``2**-COEF_SHIFT``) predictor weights per latent class
                            over the causal features ``[MED, W, N, NW, NE, WW, NN, NWW, NNW, NNE]``
``scale_a``   (K,)          slope of the scale index over the causal energy (``2**-8``)
``scale_b``   (K,)          offset of the scale index (``2**-8``)
``scale_c``   (K,)          slope of the scale index over the neighbours' MED errors (``2**-8``)
``prior``     (K,)          counts of the categorical prior p(z) (sum ``2**16``, each >= 1)
``prior_len`` (K,)          -log2 p(z) in 1/256 bit (used only by q(z|x))
``pmf``       (NS, NQ, 127) counts of the signed residual bucket per scale index and
                            eighth-pixel phase of the prediction (rows sum to ``2**24``
                            exactly in v2; within -16 .. +123 of it in v1)
``sym_len``   (NS, NQ, 127) -log2 pmf + mantissa bits, in 1/256 bit (used only by q(z|x))
``exp2neg``   (D,)          ``round(2**24 * 2**(-d/256))``: posterior weights from code lengths

Metadata ``stream`` (absent: 1) is the global stream version the model writes. Version 2
(``global-vae-v2``, written by ``train --quantize-from``) codes with the project's integer rANS
(:mod:`..rans`) and requires exact tables: every ``pmf`` row sums to ``2**24`` and ``prior`` to
``2**16``, all entries >= 1, so the tables reach the coder unchanged. Version 1 hands float
copies of the tables to constriction, which re-quantises them (see the package docstring).

The weights file is written by :func:`save_model_dir` with sorted keys and no other variable
content, so the same tensors always give the same bytes (and sha256).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt

from medzip_scp.codec.errors import UnknownModelError
from medzip_scp.codec.zoo import check_model_folder

from ..rans import cumulative

__all__ = [
    "COEF_SHIFT",
    "FEATURES",
    "GlobalModel",
    "ModelNotFoundError",
    "NQ",
    "NS",
    "NSYM",
    "PMF_BITS",
    "PRIOR_BITS",
    "build_tables",
    "load_model_dir",
    "save_model_dir",
]

COEF_SHIFT = 12
NS = 144  # scale grid: sigma_k = 2**(k/8 - 3), k = 0..143 (0.125 .. ~30000)
NQ = 8  # phase of the prediction inside its integer bin, eighths
NSYM = 127  # signed magnitude buckets: 63 + sign * bucket, bucket 0..63
FEATURES = ("MED", "W", "N", "NW", "NE", "WW", "NN", "NWW", "NNW", "NNE")
EXP2NEG_LEN = 256 * 40
PMF_BITS = 24
PRIOR_BITS = 16
PMF_TOTAL = 1 << PMF_BITS
PRIOR_TOTAL = 1 << PRIOR_BITS
WEIGHTS_FILE = "weights.safetensors"


class ModelNotFoundError(UnknownModelError):
    """The global-path model cannot be used: not installed, its files do not match their
    manifest, or its tables or stream version are not ones this decoder codes."""

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(model_id, "unknown", "0" * 64, reason)


@dataclass(frozen=True)
class GlobalModel:
    """Integer parameters of the global path (immutable; safe to share between threads)."""

    model_id: str
    block: int
    coef: npt.NDArray[np.int64]
    scale_a: npt.NDArray[np.int64]
    scale_b: npt.NDArray[np.int64]
    scale_c: npt.NDArray[np.int64]
    prior: npt.NDArray[np.int64]
    prior_len: npt.NDArray[np.int64]
    pmf: npt.NDArray[np.int32]
    sym_len: npt.NDArray[np.int64]
    exp2neg: npt.NDArray[np.int64]
    sha256: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    stream_version: int = 1

    @property
    def K(self) -> int:  # noqa: N802 - paper symbol
        return int(self.coef.shape[0])

    @cached_property
    def pixel_cums(self) -> list[list[int]]:
        """Cumulative ``pmf`` rows (Python ints) for stream 2; row ``sidx * NQ + phase``."""
        return cumulative(self.pmf.reshape(NS * NQ, NSYM))

    @cached_property
    def prior_cum(self) -> list[int]:
        """Cumulative prior counts (``K + 1`` Python ints, last ``2**16``) for stream 2."""
        return [0, *np.cumsum(self.prior).tolist()]

    @property
    def tag(self) -> bytes:
        """8 bytes of the weights' sha256, written into every stream."""
        return bytes.fromhex(self.sha256[:16]) if self.sha256 else b"\0" * 8


def _logistic_cdf(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def bucket_edges() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Magnitude buckets: (lo, hi inclusive, mantissa bits) for bucket 0..63."""
    lo, hi, m = [], [], []
    for b in range(16):
        lo.append(b)
        hi.append(b)
        m.append(0)
    for k in range(4, 16):
        for sub in range(4):
            a = (1 << k) + (sub << (k - 2))
            lo.append(a)
            hi.append(a + (1 << (k - 2)) - 1)
            m.append(k - 2)
    return np.array(lo), np.array(hi), np.array(m)


def build_tables() -> dict[str, npt.NDArray[np.int64]]:
    """Integer tables of a discretised logistic on the fixed scale grid (build time only).

    Float math happens here, once, when a model is written; the integer results are stored in
    the weights file and are all the coder ever reads.
    """
    lo, hi, mbits = bucket_edges()
    sig = 2.0 ** (np.arange(NS) / 8.0 - 3.0)
    center = (np.arange(NQ) + 0.5) / NQ
    pmf = np.zeros((NS, NQ, NSYM), np.float64)
    for q in range(NQ):
        c = center[q]
        # positive side r in [lo, hi]; negative side r in [-hi, -lo]
        pos = _logistic_cdf((hi[None] + 0.5 - c) / sig[:, None]) - _logistic_cdf(
            (lo[None] - 0.5 - c) / sig[:, None]
        )
        neg = _logistic_cdf((-lo[None] + 0.5 - c) / sig[:, None]) - _logistic_cdf(
            (-hi[None] - 0.5 - c) / sig[:, None]
        )
        pmf[:, q, 63:] = pos
        pmf[:, q, :63] = neg[:, 1:][:, ::-1]
        pmf[:, q, 63] = pos[:, 0]
    counts = np.maximum(1, np.round(pmf / pmf.sum(-1, keepdims=True) * PMF_TOTAL)).astype(np.int64)
    prob = counts / counts.sum(-1, keepdims=True)
    mant = np.concatenate([mbits[1:][::-1], mbits])
    sym_len = np.round(256 * (-np.log2(prob) + mant[None, None])).astype(np.int64)
    exp2neg = np.round(PMF_TOTAL * 2.0 ** (-np.arange(EXP2NEG_LEN) / 256.0)).astype(np.int64)
    return {"pmf": counts, "sym_len": sym_len, "exp2neg": exp2neg}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _safetensors_bytes(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """A safetensors file of int32 tensors, keys sorted: the same input gives the same bytes
    (``safetensors.numpy.save_file`` writes the metadata in hash order)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<i4")
        span = [offset, offset + a.nbytes]
        header[name] = {"dtype": "I32", "shape": list(a.shape), "data_offsets": span}
        blobs.append(a.tobytes())
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def save_model_dir(
    out_dir: Path, model_id: str, tensors: dict[str, np.ndarray], meta: dict[str, str]
) -> str:
    """Write ``weights.safetensors`` and ``manifest.json``; return the weights' sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS_FILE
    path.write_bytes(_safetensors_bytes(tensors, {"model_id": model_id, **meta}))
    digest = _sha256(path)
    manifest = {"model_id": model_id, "files": {WEIGHTS_FILE: digest}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return digest


def load_model_dir(model_id: str, directory: Path) -> GlobalModel:
    """Load and sha256-check a model directory written by :func:`save_model_dir`.

    Raises
    ------
    ModelNotFoundError
        If the directory, manifest or weights are missing, or a file's sha256 differs from
        the manifest.
    """
    try:
        files, _ = check_model_folder(model_id, directory, (WEIGHTS_FILE,))
    except UnknownModelError as exc:
        raise ModelNotFoundError(model_id, exc.reason) from None
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), framework="numpy") as f:
        meta = dict(f.metadata() or {})
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    i64 = {k: v.astype(np.int64) for k, v in t.items()}
    stream_version = int(meta.get("stream", "1"))
    if stream_version not in (1, 2):
        raise ModelNotFoundError(
            model_id,
            f"in {directory} writes global stream version {stream_version}; this build of "
            "medzip codes versions 1 and 2, update medzip",
        )
    if stream_version == 2:
        _check_exact_tables(model_id, directory, i64["pmf"], i64["prior"])
    return GlobalModel(
        model_id=meta.get("model_id", model_id),
        block=int(meta["block"]),
        coef=i64["coef"],
        scale_a=i64["scale_a"],
        scale_b=i64["scale_b"],
        scale_c=i64["scale_c"],
        prior=i64["prior"],
        prior_len=i64["prior_len"],
        pmf=t["pmf"].astype(np.int32),
        sym_len=i64["sym_len"],
        exp2neg=i64["exp2neg"],
        sha256=files[WEIGHTS_FILE],
        extra=meta,
        stream_version=stream_version,
    )


def _check_exact_tables(
    model_id: str, directory: Path, pmf: npt.NDArray[np.int64], prior: npt.NDArray[np.int64]
) -> None:
    """Stream version 2 codes with the tables as stored: they must already be exact."""
    for name, table, total in (("pmf", pmf, PMF_TOTAL), ("prior", prior, PRIOR_TOTAL)):
        if int(table.min()) < 1 or np.any(table.sum(axis=-1) != total):
            raise ModelNotFoundError(
                model_id,
                f"in {directory}: table {name!r} is not an exact integer table (entries >= 1, "
                f"rows summing to {total}); rebuild it with "
                "`python -m medzip_scp.codec.learned.global_path.train --quantize-from`",
            )
