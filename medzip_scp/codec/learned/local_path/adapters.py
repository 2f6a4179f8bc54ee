"""Per-modality LoRA adapters (``peft``) for the local-path network: the A-LoRA hook.

An adapter lives in ``models/local-lm/<version>/adapters/<name>/`` (``adapter_model.safetensors``
and ``adapter_config.json``, both in the model manifest).  At load time it is merged into the
base weights (``merge_and_unload``), so coding uses one plain float64 network and the
determinism argument of the package is unchanged.  The stream header records the adapter's
sha256 prefix, so a stream can only be decoded with the adapter it was coded with.
"""

from __future__ import annotations

from pathlib import Path

from . import float_net as F

TARGETS = ["c_attn", "c_proj", "c_fc"]


def lora_wrap(net: F.LocalNet, r: int = 4):  # noqa: ANN201
    """Wrap ``net.backbone`` with fresh LoRA layers (only those train); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=TARGETS,
        lora_dropout=0.0,
        fan_in_fan_out=True,
        bias="none",
    )
    net.backbone = get_peft_model(net.backbone, cfg)
    return net.backbone


def merge_adapter(net: F.LocalNet, adapter_dir: Path) -> None:
    """Load the LoRA adapter at ``adapter_dir`` and merge it into ``net`` in place."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(net.backbone, str(adapter_dir))
    net.backbone = peft_model.merge_and_unload()
