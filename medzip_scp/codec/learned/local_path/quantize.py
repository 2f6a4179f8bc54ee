"""Make an integer local-path model (for :mod:`.intnet`) from a float one: ``--quantize-from``.

Usage (how ``models/local-lm/v2`` was made from ``models/local-lm/v1``; no torch needed)::

    .venv/bin/python -m medzip_scp.codec.learned.local_path.train \\
        --quantize-from models/local-lm/v1 --out models/local-lm/v2

Bit-reproducible on any machine: weights are float32, so ``w * 2**k`` is exact in float64 and
``np.rint`` rounds it (half to even) without error; the lookup tables are computed with Python's
``decimal`` module, whose ``exp``, ``ln`` and ``sqrt`` are correctly rounded (not the platform's
libm), and rounded to integers half to even.

Written files (all listed with their sha256 in ``manifest.json``):

- ``weights.safetensors`` (int32): per linear layer ``<name>.weight`` (in, out) ``round(w 2**k)``
  with ``|w_int| <= 2**14``, ``<name>.bias`` ``round(b 2**(ACT + k))``, ``<name>.shift`` = k;
  per LayerNorm the same for gamma/beta; ``wpe`` ``round(p 2**ACT)``; ``ln_eps``; the lookup
  tables ``lut.exp``, ``lut.gelu``, ``lut.ln``, ``lut.ln2``, ``lut.ls_offset`` (see
  :mod:`.intnet`).
- ``tables.safetensors``: the float model's integer frequency tables, byte for byte.
- ``adapters/<name>/adapter.safetensors`` (int32): each LoRA pair as integers ``lora_A`` (r, in)
  and ``lora_B`` (out, r) with their shifts, the LoRA scaling folded into ``lora_B``; merged at
  load time in integers (:func:`merge_adapter`).
- ``config.json``: the network shape, the kernel constants and the source model's manifest sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from pathlib import Path

import numpy as np
import numpy.typing as npt

from . import intnet as K
from . import model as M

KERNEL_FORMAT = "int-v1"
_PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459")
_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _int(x: Decimal) -> int:
    return int(x.to_integral_value(rounding=ROUND_HALF_EVEN))


def build_luts() -> dict[str, npt.NDArray[np.int32]]:
    """The kernel's lookup tables (see :mod:`.intnet`), with correctly rounded decimal maths."""
    with localcontext() as ctx:
        ctx.prec = 40
        one_exp = Decimal(2) ** K.EXP_ONE
        exp = []
        i = 0
        while not exp or exp[-1] != 0:
            exp.append(_int((Decimal(-i) / 2**K.LOGIT).exp() * one_exp))
            i += 1
        c = (2 / _PI).sqrt()
        gelu = []
        lim = K.GELU_RANGE << K.ACT
        for j in range(-lim, lim + 1):
            x = Decimal(j) / 2**K.ACT
            u = c * (x + Decimal("0.044715") * x**3)
            tanh = 1 - 2 / ((2 * u).exp() + 1)
            gelu.append(_int(x * (1 + tanh) / 2 * 2**K.ACT))
        unit = Decimal(2) ** K.LN_FRAC
        ln = [0] + [_int(Decimal(m).ln() * unit) for m in range(1, (1 << K.LN_BITS) + 1)]
        ln2 = _int(Decimal(2).ln() * unit)
        ls = [0] + [
            _int(8 * (s * Decimal(2).ln() - Decimal("0.1").ln()) * 2**K.ACT)
            for s in range(1, M.S_MAX + 1)
        ]
    return {
        "lut.exp": np.array(exp, np.int32),
        "lut.gelu": np.array(gelu, np.int32),
        "lut.ln": np.array(ln, np.int32),
        "lut.ln2": np.array([ln2], np.int32),
        "lut.ls_offset": np.array(ls, np.int32),
    }


def _shift_for(a: npt.NDArray) -> int:
    """Largest power-of-two exponent k with ``max|a| * 2**k <= 2**WEIGHT_BITS``."""
    m = float(np.abs(a).max())
    return K.WEIGHT_BITS - math.frexp(m)[1] if m > 0 else K.WEIGHT_BITS


def _scaled(a: npt.NDArray, k: int) -> npt.NDArray[np.int32]:
    v = np.rint(np.asarray(a, np.float64) * 2.0**k)  # exact product of float32 and 2**k
    if np.abs(v).max(initial=0) >= 2**31:
        raise ValueError(f"quantised value {np.abs(v).max()} does not fit int32")
    return np.ascontiguousarray(v, dtype=np.int32)  # safetensors writes the raw buffer


def _affine(w: npt.NDArray, b: npt.NDArray, prefix: str) -> dict[str, npt.NDArray[np.int32]]:
    k = _shift_for(w)
    return {
        f"{prefix}.weight": _scaled(w, k),
        f"{prefix}.bias": _scaled(b, K.ACT + k),
        f"{prefix}.shift": np.array([k], np.int32),
    }


def quantize_weights(w: dict[str, npt.NDArray], layers: int) -> dict[str, npt.NDArray[np.int32]]:
    """Integer tensors of :class:`~.intnet.IntNet` from the float state dict of ``LocalNet``."""
    out = _affine(w["inp.weight"].T, w["inp.bias"], "inp")
    out |= _affine(w["head.weight"].T, w["head.bias"], "head")
    out["wpe"] = _scaled(w["backbone.wpe.weight"], K.ACT)
    out |= _affine(w["backbone.ln_f.weight"], w["backbone.ln_f.bias"], "ln_f")
    for i in range(layers):
        p = f"backbone.h.{i}"
        for ln in ("ln_1", "ln_2"):
            out |= _affine(w[f"{p}.{ln}.weight"], w[f"{p}.{ln}.bias"], f"h.{i}.{ln}")
        for name in _LINEARS:  # GPT-2's Conv1D weights are already (in, out)
            out |= _affine(w[f"{p}.{name}.weight"], w[f"{p}.{name}.bias"], f"h.{i}.{name}")
    with localcontext() as ctx:
        ctx.prec = 40
        hidden = w["backbone.wpe.weight"].shape[1]
        eps = Decimal(str(K.LN_EPS)) * hidden**3 * Decimal(2) ** (2 * K.ACT)
        out["ln_eps"] = np.array([_int(eps)], np.int32)
    return out


def quantize_adapter(a: dict[str, npt.NDArray], scaling: float) -> dict[str, npt.NDArray[np.int32]]:
    """Integer LoRA factors from a ``peft`` adapter state dict (``fan_in_fan_out`` Conv1D: the
    merged weight is ``W + scaling (B A)^T``); the scaling is folded into ``lora_B``."""
    out: dict[str, npt.NDArray[np.int32]] = {}
    prefix = "base_model.model."
    for key, val in a.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(prefix) : -len(".lora_A.weight")]
        b = a[f"{prefix}{name}.lora_B.weight"].astype(np.float64) * scaling
        for part, arr in (("lora_A", val), ("lora_B", b)):
            k = _shift_for(arr)
            out[f"{name}.{part}"] = _scaled(arr, k)
            out[f"{name}.{part}.shift"] = np.array([k], np.int32)
    return out


def merge_adapter(
    weights: dict[str, npt.NDArray], adapter: dict[str, npt.NDArray]
) -> dict[str, npt.NDArray[np.int64]]:
    """Integer weights with an integer LoRA adapter merged: ``W += round((A^T B^T) 2**(k -
    kA - kB))`` per target, in int64 (exact)."""
    out = {k: np.asarray(v, np.int64) for k, v in weights.items()}
    for key in adapter:
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        a = np.asarray(adapter[key], np.int64)
        b = np.asarray(adapter[f"{name}.lora_B"], np.int64)
        drop = int(adapter[f"{key}.shift"][0]) + int(adapter[f"{name}.lora_B.shift"][0])
        drop -= int(out[f"{name}.shift"][0])
        delta = a.T @ b.T  # (in, out), |entries| < r 2**28: exact in int64
        out[f"{name}.weight"] = out[f"{name}.weight"] + K._shr_round(delta, drop)
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def quantize_model(src: Path, out: Path) -> dict:
    """Write the integer model of the float model folder ``src`` to the new folder ``out``.

    Returns a summary (the source manifest sha256, tensor count, exactness margins).

    Raises
    ------
    FileExistsError
        If ``out`` already holds a model (model ids are never reused).
    """
    from safetensors.numpy import load_file, save_file

    from . import write_manifest

    if (out / "manifest.json").exists():
        raise FileExistsError(
            f"{out} already holds a model; model ids are never reused: choose a new version"
        )
    cfg = json.loads((src / "config.json").read_text())
    net_cfg = M.NetConfig(**cfg["net"])
    tensors = quantize_weights(load_file(src / "weights.safetensors"), net_cfg.layers)
    tensors |= build_luts()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "weights.safetensors")
    shutil.copyfile(src / "tables.safetensors", out / "tables.safetensors")
    margins = K.IntNet(tensors, net_cfg.heads).margins
    adapters = {}
    for ad in sorted((src / "adapters").glob("*/adapter_config.json")):
        acfg = json.loads(ad.read_text())
        q = quantize_adapter(
            load_file(ad.parent / "adapter_model.safetensors"), acfg["lora_alpha"] / acfg["r"]
        )
        K.IntNet(merge_adapter(tensors, q), net_cfg.heads)  # its bounds hold too
        (out / "adapters" / ad.parent.name).mkdir(parents=True, exist_ok=True)
        save_file(q, out / "adapters" / ad.parent.name / "adapter.safetensors")
        adapters[ad.parent.name] = {"r": acfg["r"], "lora_alpha": acfg["lora_alpha"]}
    info = {
        "quantized_from": {
            "folder": f"{src.parent.name}/{src.name}",
            "manifest_sha256": _sha(src / "manifest.json"),
        },
        "adapters": adapters,
        "max_partial_sum_log2": {k: round(v, 2) for k, v in margins.items()},
    }
    config = {
        "net": net_cfg.to_dict(),
        "kernel": {
            "format": KERNEL_FORMAT,
            "act_bits": K.ACT,
            "logit_bits": K.LOGIT,
            "exp_one_bits": K.EXP_ONE,
            "gelu_range": K.GELU_RANGE,
            "weight_bits": K.WEIGHT_BITS,
        },
        "quantize": info,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    write_manifest(out)
    return info
