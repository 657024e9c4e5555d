"""What trains and how it is recomputed: freezing to the trainable patterns, peft LoRA on the
attention projections, activation checkpointing. Each `apply_*` takes the model and its own
config section, nothing else."""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import torch.nn as nn

from model.config import WanConfig

if TYPE_CHECKING:
    from ds_trainer.config import AdapterSection, ModelSection

log = logging.getLogger(__name__)

# Trainable new layers of the OpenS2V adapters (the seed's list), by parameter-name pattern.
REFERENCE_PATTERNS = (r"^clip_proj\.", r"^vae_proj\.", r"\.cross_attn\.(k_vae|v_vae|norm_k_vae)\.")
FUSED_PATTERNS = (r"\.cross_attn\.(k_fused|v_fused|norm_k_fused)\.",)
CLIP_PATH_PATTERNS = (r"\.cross_attn\.(k_img|v_img|norm_k_img)\.",)  # new on a T2V base
# diffusers LoRA target names (the seed's) -> Wan module names
LORA_NAME_MAP = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out": "o", "to_out.0": "o"}


def reference_trainable_patterns(cfg: WanConfig) -> tuple[str, ...]:
    """The new layers of the subject-reference paths `cfg` carries: the VAE path always, the fused
    path when on, and the CLIP path's k_img/v_img when they are new (a T2V base has none)."""
    refs = cfg.reference_paths
    clip_path_is_new = cfg.model_type == "t2v" and refs.clip
    return (REFERENCE_PATTERNS + (FUSED_PATTERNS if refs.fused else ())
            + (CLIP_PATH_PATTERNS if clip_path_is_new else ()))


def apply_freeze(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Freeze everything, then unfreeze parameters matching `patterns` (and LoRA weights).
    Returns the trainable names; no match at all is an error."""
    regex = re.compile("|".join(patterns))
    names = []
    for name, p in model.named_parameters():
        train = bool(regex.search(name)) or "lora_" in name
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ValueError(f"no parameter matches the trainable patterns {patterns}")
    return names


ALL_LINEAR = "all-linear"
"""The target that means every Linear of the transformer blocks (attention q/k/v/o and the image
keys, the FFN), as LongLive puts LoRA on every Linear of its causal blocks; the reference
adapters' own layers (trained in full) are left out."""


def lora_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Map seed / diffusers target names to Wan's and check each matches a Linear of the blocks'
    attention (or `all-linear`: every Linear of the blocks but the adapters'); a target that
    matches nothing is an error."""
    if ALL_LINEAR in targets:
        if targets != [ALL_LINEAR]:
            raise ValueError(f"adapter.target_modules: {ALL_LINEAR!r} stands alone (got {targets})")
        from model.checkpoint import is_adapter_key  # noqa: PLC0415
        config = getattr(model, "config", None)
        return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                      and re.match(r"blocks\.\d+\.", n) and not (config and is_adapter_key(n + ".weight", config)))
    wan = [LORA_NAME_MAP.get(t, t) for t in targets]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.search(r"blocks\.\d+\.(self|cross)_attn\.", n)]
    out = []
    for original, name in zip(targets, wan):
        if not any(n.endswith("." + name) for n in linears):
            raise ValueError(f"adapter.target_modules: {original!r} (Wan name {name!r}) matches no attention Linear; "
                             f"Wan's are q, k, v, o (diffusers' to_q, to_k, to_v, to_out), or {ALL_LINEAR!r}")
        out.append(name)
    # exact module paths so peft cannot match a same-named Linear outside the attention blocks
    return sorted(n for n in linears if n.rsplit(".", 1)[-1] in out)


def apply_lora(model: nn.Module, adapter: "AdapterSection") -> nn.Module:
    """Wrap the attention projections with peft LoRA (in place); returns the model."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

    modules = lora_target_modules(model, adapter.target_modules)
    cfg = LoraConfig(r=adapter.r, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                     target_modules=modules, init_lora_weights=True)
    model = inject_adapter_in_model(cfg, model)
    model.peft_config = {"default": cfg}
    log.info("LoRA r=%d alpha=%d on %d Linears of the blocks", adapter.r, adapter.lora_alpha, len(modules))
    return model


def apply_activation_checkpointing(model: nn.Module, section: "ModelSection") -> None:
    """With `section.activation_checkpointing`, recompute every transformer block in the backward
    pass (non-reentrant, so frozen parameters and ZeRO-3 hooks are fine; state-dict keys unchanged)."""
    model.gradient_checkpointing = section.activation_checkpointing
