"""The float64 local-path network of ``local-lm-v1`` (``torch`` + ``transformers``), and the
training loss.

Only training, quantisation (:mod:`.quantize`) and decoding version-1 streams import this module
(and so ``torch``); version-2 streams are decoded by the integer kernel of :mod:`.intnet` alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

from .model import N_FEAT, TOKENS, NetConfig


class LocalNet(nn.Module):
    """Causal transformer (a tiny GPT-2 built with ``transformers``) over the tokens of a tile."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(N_FEAT, cfg.hidden)
        gcfg = GPT2Config(
            vocab_size=2,  # unused: the tokens enter as inputs_embeds
            n_embd=cfg.hidden,
            n_inner=cfg.intermediate,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            n_positions=TOKENS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            activation_function="gelu_new",
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        # GPT-2 keeps LayerNorm, attention and softmax in the parameters' dtype (float64 at
        # inference); Llama's RMSNorm and rotary tables would round through float32.
        self.gcfg = gcfg
        self.backbone = GPT2Model(gcfg)
        self.head = nn.Linear(cfg.hidden, 8)
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.bias[4:].fill_(0.0)

    def forward(
        self,
        feats: torch.Tensor,
        past_key_values=None,  # noqa: ANN001
        position: int | None = None,
    ) -> tuple[torch.Tensor, object]:
        """``feats`` (B, T, N_FEAT) -> (B, T, 4, 2) raw outputs (location, log-scale), cache."""
        x = self.inp(feats)
        kw: dict = {"inputs_embeds": x, "use_cache": position is not None}
        if position is not None:
            if past_key_values is None:
                from transformers import StaticCache

                past_key_values = StaticCache(config=self.gcfg, max_cache_len=TOKENS)
            kw["position_ids"] = torch.full((x.shape[0], x.shape[1]), position, dtype=torch.long)
            kw["cache_position"] = torch.tensor([position], dtype=torch.long)
            kw["cache"] = past_key_values
        out = self.backbone(**kw)
        y = self.head(out.last_hidden_state)
        return y.view(*y.shape[:2], 4, 2), out.cache


def nll_bits(
    raw: torch.Tensor, off: torch.Tensor, low: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Training loss: bits of ``low`` (B, T, 4) under the continuous interval-restricted logistic.

    ``raw`` (B, T, 4, 2), ``off`` (B, T, 4) as from :func:`features`, ``s`` (B, 1, 1) planes.
    Units: window widths ``2**s``.
    """
    q = (2.0**s).to(raw.dtype)
    mu = off + raw[..., 0]
    inv = torch.exp(-raw[..., 1])
    lo_e = (low - 0.5) / q
    hi_e = (low + 0.5) / q
    a0 = (-0.5 / q - mu) * inv
    a1 = ((q - 0.5) / q - mu) * inv
    num = _log_diff_sigmoid((hi_e - mu) * inv, (lo_e - mu) * inv)
    den = _log_diff_sigmoid(a1, a0)
    return -(num - den) / math.log(2.0)


def _log_diff_sigmoid(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(a) - sigmoid(b)) for a > b, stable on both tails."""
    flip = (a + b) > 0
    a2 = torch.where(flip, -b, a)
    b2 = torch.where(flip, -a, b)
    la = torch.nn.functional.logsigmoid(a2)
    lb = torch.nn.functional.logsigmoid(b2)
    return la + torch.log(-torch.expm1((lb - la).clamp(max=-1e-7)))
