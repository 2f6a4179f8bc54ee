"""Integer inference kernel of the local-path network (``local-lm-v2`` and later): numpy only.

The same function as :class:`~.float_net.LocalNet` (GPT-2: input projection, 2 pre-LayerNorm
blocks of causal attention and ``gelu_new`` MLP, final LayerNorm, output projection), evaluated
in integer arithmetic from integer weights, so that the table indices that reach the ANS coder
are the same on every CPU, thread count, batch size and library version.  No ``torch``, no
``transformers``, no ``np.exp``/``np.log``/``np.sqrt``: every value is an integer, every
nonlinearity a shipped integer lookup table or an integer Newton iteration.

Number format
-------------
Every activation is an integer ``a`` standing for ``a / 2**ACT`` (``ACT = 12``).  A linear layer
stores ``round(w * 2**k)`` (``|w_int| <= 2**14``, one power-of-two exponent ``k`` per tensor) and
``round(b * 2**(ACT + k))``; it returns ``(x @ w_int + b_int + 2**(k-1)) >> k`` (``>>`` is floor
division by a power of two, on int64).

Exactness of the matrix products
--------------------------------
Products ``x @ w`` of integer-valued arrays run in float64 BLAS (fast) and are *exact*: every
product and every partial sum is an integer of magnitude below ``2**53``, so it is represented
exactly whatever order, blocking or FMA the library uses.  :meth:`IntNet.check_bounds` proves the
bound at load time from the weights alone: each layer's input has a static bound (features by
construction, LayerNorm outputs by ``|x - mean| <= sqrt(n var)``, attention outputs by being
weighted means of values, GELU by ``|gelu(x)| <= |x|``), so ``sum_k |x_k| |w_kj| <= X * max_j
sum_k |w_kj|``; the model refuses to load if any bound reaches ``2**53`` (or ``2**63`` for the
int64 LayerNorm sums).  The measured margins of ``local-lm-v2`` are in its ``CARD.md``.

Nonlinearities
--------------
- LayerNorm (n = 64): ``c = n x - sum(x)``, ``V = sum(c**2) + E`` (``E`` = round(eps n**3
  2**(2 ACT)), the epsilon in these units), ``r = isqrt(V)`` by an integer Newton iteration,
  ``y = (c * sqrt(n) * 2**ACT) // r``, then ``(y * g_int + b_int + half) >> k``.  A row whose
  ``max |c|`` reaches ``2**26`` (far beyond the trained model's activations, but not excluded by
  the static bounds) first has ``c`` and ``E`` scaled down by a power of two, so ``V < 2**58``
  for any input.
- Attention: logits ``q.k / sqrt(16)`` floored to ``1/2**LOGIT`` (``LOGIT = 10``), minus the row
  maximum over the causal window, index the table ``exp(-i / 2**LOGIT) * 2**EXP_ONE``; the output
  is ``(sum_j e_j v_j + sum_j e_j // 2) // sum_j e_j``.
- GELU (``gelu_new``): a table over ``[-8, 8]`` in steps of ``2**-ACT``; ``x`` above 8 passes
  through, below -8 gives 0 (both exact to ~1e-14).
- The signed ``log1p`` feature: a table of ``ln m`` for ``m <= 2**13`` in units of
  ``2**-(ACT+4)``, larger arguments rounded to 13 significant bits (``ln(m 2**k) = ln m + k ln 2``).

The tables are made by :mod:`.quantize` with Python's ``decimal`` (correctly rounded ``exp``/``ln``,
so the build is bit-reproducible on any machine) and shipped in ``weights.safetensors``.

Outputs
-------
Per pixel the location index ``floor(8 (ref - base) + 8 q raw_mu + 1/2)`` and the log-scale index
``floor(8 (raw_ls + s ln 2 - ln 0.1) + 1/2)`` are computed by integer floor division from the
integer outputs, clipped to the shipped tables' ranges (:func:`.model.mu_range`, ``N_LS``): no
margin check is needed, the encoder and the decoder compute the same integers.

The encoder and the decoder run the same steps (:meth:`IntNet.step`: one token of every tile of
a batch, with a key/value cache); the encoder has all features up front (teacher forcing), the
decoder computes each step's features from the values decoded so far.  Batch size, chunking and
thread count change neither the operations nor the integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import model as M

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

ACT = 12  # fractional bits of every activation
LOGIT = 10  # fractional bits of the attention logits that index the exp table
EXP_ONE = 20  # exp table: exp(0) = 2**EXP_ONE
GELU_RANGE = 8  # the GELU table covers [-GELU_RANGE, GELU_RANGE]
LN_BITS = 13  # the ln table covers 1 .. 2**LN_BITS
LN_FRAC = ACT + 4  # ln table units: 2**-LN_FRAC
LN_MAX_BITS = 21  # log1p arguments 4q + |d| < 2**21 (values < 2**16, so |d| < 2**19)
LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon
LN_C_BITS = 26  # LayerNorm: |n x - sum(x)| kept below 2**LN_C_BITS, so sum of squares < 2**58
WEIGHT_BITS = 14  # |w_int| <= 2**WEIGHT_BITS
_EXACT_F64 = 1 << 53
_EXACT_I64 = 1 << 63


def _shr_round(x: I64, k: int) -> I64:
    """``round(x / 2**k)``, halves up (floor of ``x / 2**k + 1/2``)."""
    return (x + (1 << (k - 1))) >> k if k > 0 else x << -k


def _bit_length(v: I64) -> I64:
    """Bit length of non-negative int64 values (binary search on shifts; integer only)."""
    n = np.zeros_like(v)
    t = v.copy()
    for k in (32, 16, 8, 4, 2, 1):
        m = (t >> k) > 0
        t = np.where(m, t >> k, t)
        n += m * k
    return n + (t > 0)


def isqrt(v: I64) -> I64:
    """``floor(sqrt(v))`` of positive int64 values below ``2**62`` by integer Newton iteration."""
    y = np.left_shift(np.int64(1), (_bit_length(v) + 1) >> 1)  # >= sqrt(v), < 2 sqrt(v) + 1
    for _ in range(7):  # relative error 1 -> 0.25 -> 0.025 -> 3e-4 -> 5e-8 -> 1e-15
        y = np.minimum(y, (y + v // y) >> 1)
    y -= y * y > v
    y += (y + 1) * (y + 1) <= v
    return y


@dataclass(frozen=True)
class IntLinear:
    """``y = (x @ w + b + 2**(shift-1)) >> shift``; ``w`` integer-valued float64 (in, out)."""

    w: F64
    b: I64
    shift: int

    def __call__(self, x: I64) -> I64:
        x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)  # one 2-D product: BLAS gemm
        acc = (x2 @ self.w).astype(np.int64).reshape(*x.shape[:-1], -1)
        return _shr_round(acc + self.b, self.shift)

    def bound(self, x_bound: int) -> int:
        """Bound of ``|output|`` for ``|x| <= x_bound``; asserts the float64 product is exact."""
        col = int(np.abs(self.w).sum(axis=0).max())
        acc = x_bound * col
        if acc >= _EXACT_F64:
            raise ValueError(f"matmul bound {acc} >= 2**53: not exact in float64")
        return ((acc + int(np.abs(self.b).max()) + (1 << self.shift)) >> self.shift) + 1

    def margin(self, x_bound: int) -> float:
        return math.log2(x_bound * int(np.abs(self.w).sum(axis=0).max()))


@dataclass(frozen=True)
class IntLayerNorm:
    """LayerNorm over the last axis in integers (module docstring); ``g`` (scale 2**shift) and
    ``b`` (scale 2**(ACT + shift))."""

    g: I64
    b: I64
    shift: int
    eps: int

    def __call__(self, x: I64) -> I64:
        n = x.shape[-1]
        c = n * x - x.sum(axis=-1, keepdims=True)
        eps: int | I64 = self.eps
        big = np.abs(c).max(axis=-1, keepdims=True)
        if big.max(initial=0) >> LN_C_BITS:  # never seen in practice; same result row by row
            # rows with |c| >= 2**LN_C_BITS are scaled down (with the epsilon): sum(c**2) < 2**58
            k = np.maximum(_bit_length(big) - LN_C_BITS, 0)
            c >>= k
            eps = self.eps >> (2 * k)
        r = isqrt((c * c).sum(axis=-1, keepdims=True) + eps)
        y = (c * (math.isqrt(n) << ACT)) // r
        return _shr_round(y * self.g + self.b, self.shift)

    def bound(self, x_bound: int) -> int:
        n = len(self.g)
        c = 1 << LN_C_BITS
        if 2 * n * x_bound >= _EXACT_I64 or n * c * c + self.eps >= 1 << 62:
            raise ValueError(f"LayerNorm input bound {x_bound} overflows int64")
        y = (math.isqrt(n) << ACT) * math.isqrt(self.eps) // (math.isqrt(self.eps) - 1) + 1
        return ((y * int(np.abs(self.g).max()) + int(np.abs(self.b).max())) >> self.shift) + 2

    def margin(self, x_bound: int) -> float:
        return math.log2(2 * len(self.g) * x_bound)


@dataclass(frozen=True)
class IntBlock:
    ln_1: IntLayerNorm
    c_attn: IntLinear
    attn_proj: IntLinear
    ln_2: IntLayerNorm
    c_fc: IntLinear
    mlp_proj: IntLinear


@dataclass(frozen=True)
class Tables:
    """Shipped integer lookup tables (made by :mod:`.quantize`)."""

    exp: I64  # exp(-i / 2**LOGIT) * 2**EXP_ONE, ends with 0
    gelu: I64  # gelu_new((i - GELU_RANGE 2**ACT) / 2**ACT) * 2**ACT
    ln: I64  # ln(m) * 2**LN_FRAC, m = 0 .. 2**LN_BITS (entry 0 unused)
    ln2: int  # ln(2) * 2**LN_FRAC
    ls_offset: I64  # (S_MAX + 1,): 8 (s ln 2 - ln 0.1) * 2**ACT


class IntNet:
    """The integer local-path network; see the module docstring.

    Parameters
    ----------
    tensors
        The integer tensors of ``weights.safetensors`` (names as :mod:`.quantize` writes them).
    heads
        Attention heads.
    """

    def __init__(self, tensors: dict[str, npt.NDArray], heads: int) -> None:
        t = {k: np.asarray(v, dtype=np.int64) for k, v in tensors.items()}

        def lin(name: str) -> IntLinear:
            return IntLinear(
                t[f"{name}.weight"].astype(np.float64),
                t[f"{name}.bias"],
                int(t[f"{name}.shift"][0]),
            )

        eps = int(t["ln_eps"][0])

        def ln(name: str) -> IntLayerNorm:
            return IntLayerNorm(
                t[f"{name}.weight"], t[f"{name}.bias"], int(t[f"{name}.shift"][0]), eps
            )

        n_layers = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("h."))
        self.inp = lin("inp")
        self.wpe = t["wpe"]
        self.blocks = [
            IntBlock(
                ln(f"h.{i}.ln_1"),
                lin(f"h.{i}.attn.c_attn"),
                lin(f"h.{i}.attn.c_proj"),
                ln(f"h.{i}.ln_2"),
                lin(f"h.{i}.mlp.c_fc"),
                lin(f"h.{i}.mlp.c_proj"),
            )
            for i in range(n_layers)
        ]
        self.ln_f = ln("ln_f")
        self.head = lin("head")
        self.tables = Tables(
            t["lut.exp"], t["lut.gelu"], t["lut.ln"], int(t["lut.ln2"][0]), t["lut.ls_offset"]
        )
        self.hidden = self.wpe.shape[1]
        self.heads = heads
        self.head_dim = self.hidden // heads
        if self.head_dim * heads != self.hidden or self.head_dim != 16:
            raise ValueError(f"head dim must be 16 (logit scale 1/4), got {self.hidden}/{heads}")
        self.margins = self.check_bounds()

    # -- static exactness proof ---------------------------------------------------------------

    def check_bounds(self) -> dict[str, float]:
        """Prove every float64 product exact (< 2**53) and every int64 sum in range; return
        log2 of the largest partial-sum bound of each layer (see the module docstring).

        Raises
        ------
        ValueError
            If a bound is exceeded (such weights must not be shipped).
        """
        margins: dict[str, float] = {}
        feat = max_feature()
        margins["inp"] = self.inp.margin(feat)
        x = self.inp.bound(feat) + int(np.abs(self.wpe).max())
        for i, blk in enumerate(self.blocks):
            margins[f"h.{i}.ln_1"] = blk.ln_1.margin(x)
            a = blk.ln_1.bound(x)
            margins[f"h.{i}.c_attn"] = blk.c_attn.margin(a)
            qkv = blk.c_attn.bound(a)
            logits = self.head_dim * qkv * qkv
            weighted = M.TOKENS * (1 << EXP_ONE) * qkv
            margins[f"h.{i}.attn"] = math.log2(max(logits, weighted))
            if max(logits, weighted) >= _EXACT_F64:
                raise ValueError(f"attention bound of layer {i} >= 2**53")
            margins[f"h.{i}.attn_proj"] = blk.attn_proj.margin(qkv + 1)
            x += blk.attn_proj.bound(qkv + 1)
            margins[f"h.{i}.ln_2"] = blk.ln_2.margin(x)
            a = blk.ln_2.bound(x)
            margins[f"h.{i}.c_fc"] = blk.c_fc.margin(a)
            h = blk.c_fc.bound(a)
            margins[f"h.{i}.mlp_proj"] = blk.mlp_proj.margin(h)
            x += blk.mlp_proj.bound(h)
        margins["ln_f"] = self.ln_f.margin(x)
        margins["head"] = self.head.margin(self.ln_f.bound(x))
        return margins

    # -- layers -------------------------------------------------------------------------------

    def _gelu(self, h: I64) -> I64:
        lim = GELU_RANGE << ACT
        return np.where(h > lim, h, self.tables.gelu[np.clip(h, -lim, lim) + lim])

    def _attend(self, q: I64, k: F64, v: F64) -> I64:
        """One query per tile and head: q (B, H, 1, D), keys and values (B, H, n, D)."""
        s = (q.astype(np.float64) @ np.swapaxes(k, -1, -2)).astype(np.int64)
        s >>= 2 * ACT + 2 - LOGIT  # logit q.k / 4 in units of 2**-LOGIT, floored
        i = s.max(axis=-1, keepdims=True) - s
        np.minimum(i, len(self.tables.exp) - 1, out=i)
        e = self.tables.exp[i]
        num = (e.astype(np.float64) @ v).astype(np.int64)
        den = e.sum(axis=-1, keepdims=True)
        return (num + (den >> 1)) // den

    def forward(self, feats: I64) -> I64:
        """Integer features (B, T, N_FEAT) of the first T tokens of B tiles -> outputs (B, T, 8).

        The encoder's pass: the decoder's steps (:meth:`step`) one after the other, so both
        compute the same integers by construction.
        """
        cache = self.new_cache(feats.shape[0])
        return np.stack([self.step(feats[:, t], cache, t) for t in range(feats.shape[1])], 1)

    def new_cache(self, batch: int) -> list[tuple[F64, F64]]:
        """Key/value cache for :meth:`step`: per layer (B, H, TOKENS, D) keys and values, integers
        held in float64 (exact: below 2**53) so the products need no conversion."""
        shape = (batch, self.heads, M.TOKENS, self.head_dim)
        return [(np.zeros(shape), np.zeros(shape)) for _ in self.blocks]

    def step(self, feats: I64, cache: list[tuple[F64, F64]], position: int) -> I64:
        """Integer features (B, N_FEAT) of token ``position`` of B tiles -> outputs (B, 8);
        fills ``cache`` at ``position`` (tokens ``0 .. position - 1`` must be in it)."""
        b = feats.shape[0]
        n = position + 1
        x = self.inp(feats) + self.wpe[position]
        for blk, (kc, vc) in zip(self.blocks, cache, strict=True):
            q, k, v = np.split(
                blk.c_attn(blk.ln_1(x)).reshape(b, 3, self.heads, self.head_dim), 3, 1
            )
            kc[:, :, position] = k[:, 0]
            vc[:, :, position] = v[:, 0]
            a = self._attend(q.reshape(b, self.heads, 1, -1), kc[:, :, :n], vc[:, :, :n])
            x = x + blk.attn_proj(a.reshape(b, self.hidden))
            x = x + blk.mlp_proj(self._gelu(blk.c_fc(blk.ln_2(x))))
        return self.head(self.ln_f(x))

    # -- features and outputs -----------------------------------------------------------------

    def features(self, full: I64, base: I64, y0: I64, x0: I64, t: I64, s: int) -> tuple[I64, I64]:
        """Integer features (n, N_FEAT) of tokens at block origins ``(y0, x0)``, tile positions
        ``t``, and ``ref8`` (n, 4) = 8 (block midpoint - pixel base), an integer.

        The same features as :func:`.model.features` in units of ``2**-ACT``: the clipped
        linear part exactly, the signed ``log1p`` part from the ln table.
        """
        q = 1 << s
        yy = y0[:, None] + M._WOFF[None, :, 0]
        xx = x0[:, None] + M._WOFF[None, :, 1]
        known = M.KNOWN[t]
        e2 = np.where(known, 2 * full[yy, xx], 2 * base[yy, xx] + q - 1)  # 2 x window value
        own = base[y0[:, None] + M._POFF[None, :, 0], x0[:, None] + M._POFF[None, :, 1]]
        s4 = own.sum(axis=1, keepdims=True)
        d = 2 * e2 - s4 - 2 * (q - 1)  # 4 (value - midpoint) = 4 q * feature d
        n = len(y0)
        k = M.WIN * M.WIN
        f = np.zeros((n, M.N_FEAT), dtype=np.int64)
        f[:, :k] = np.clip(d, -64 * q, 64 * q) << (ACT - 4 - s)  # clip(d, -16, 16) / 4
        f[:, k : 2 * k] = np.sign(d) * self._ln_ratio(4 * q + np.abs(d), 4 * q)
        f[:, 2 * k : 3 * k] = known.astype(np.int64) << ACT
        f[:, 3 * k + s - 1] = 1 << ACT
        ref8 = 2 * s4 + 4 * (q - 1) - 8 * own
        return f, ref8

    def _ln_ratio(self, x: I64, den: int) -> I64:
        """``ln(x / den)`` in units of 2**-ACT for integers ``1 <= den <= x < 2**LN_MAX_BITS``."""
        tab = self.tables.ln
        k = np.zeros_like(x)
        for j in range(LN_BITS, LN_MAX_BITS):
            k += x >= (1 << j)
        m = (x + ((1 << k) >> 1)) >> k  # round to LN_BITS significant bits: m <= 2**LN_BITS
        return _shr_round(tab[m] + k * self.tables.ln2 - tab[den], LN_FRAC - ACT)

    def indices(self, raw: I64, ref8: I64, s: int) -> tuple[I64, I64]:
        """Outputs (n, 8) and ``ref8`` (n, 4) -> table indices ``mi, li`` (n, 4)."""
        r = raw.reshape(-1, 4, 2)
        a = (ref8 << ACT) + (r[..., 0] << (s + 3))  # 8 (ref - base + q mu) * 2**ACT
        lo, hi = M.mu_range(s)
        mi = np.clip(_shr_round(a, ACT), lo, hi) - lo
        b = (r[..., 1] << 3) + self.tables.ls_offset[s]
        li = np.clip(_shr_round(b, ACT), 0, M.N_LS - 1)
        return mi, li


def max_feature() -> int:
    """Bound of ``|feature|`` in units of 2**-ACT: the clipped part <= 4, the mask and s one-hot
    <= 1, the log1p part < ln(2**LN_MAX_BITS) (plus table rounding)."""
    return max(4 << ACT, (LN_MAX_BITS * 710 << (ACT - 10)) + 1)  # 710 / 1024 > ln 2
