"""CLIP ViT-H/14 image encoder of Wan2.1 I2V, wrapped from transformers' `CLIPVisionModel`.

Wan2.1 conditions image-to-video on the tokens of the PENULTIMATE block of the vision tower of
open-clip xlm-roberta-large-vit-huge-14 (`visual(x, use_31_block=True)`: no post-norm, no head).
That tower is a standard pre-norm ViT with a bias-free patch conv and exact GELU, which
transformers' `CLIPVisionModel` implements; this module maps the official `.pth` onto it.

The last block is never used, so the wrapped model is built with `num_hidden_layers - 1`
layers and its `last_hidden_state` (which has no post-norm) is the penultimate block's output,
equal to the full model's `hidden_states[-2]`.

Shapes: B images, H W pixels, S = CLIP_IMAGE_SIZE (224), P patch (14),
L = CLIP_TOKENS = 1 + (S / P)^2 = 257 tokens, C = CLIP_DIM = 1280 channels.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from model.config import CLIP_DIM, CLIP_TOKENS
from model.encoders.loading import check_loading_info

logger = logging.getLogger(__name__)

CLIP_IMAGE_SIZE = 224
CLIP_PATCH = 14
assert CLIP_TOKENS == 1 + (CLIP_IMAGE_SIZE // CLIP_PATCH) ** 2  # 257: class token + 16 x 16 patches
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP normalisation, applied to pixels in [0, 1]."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_VIT_H_14: Mapping[str, object] = dict(
    hidden_size=CLIP_DIM,
    intermediate_size=4 * CLIP_DIM,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=CLIP_IMAGE_SIZE,
    patch_size=CLIP_PATCH,
    hidden_act="gelu",  # exact (erf) GELU, not CLIP's usual quick_gelu
    layer_norm_eps=1e-5,
    projection_dim=1024,
)
"""transformers `CLIPVisionConfig` fields of the full (32-block) Wan2.1 CLIP vision tower."""

_VISUAL = "visual."
# Official key under `visual.transformer.N.` -> transformers key under `encoder.layers.N.`;
# `attn.to_qkv` is split by `_split_qkv`.
_BLOCK_KEYS: Mapping[str, str] = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
}
_QKV_KEYS = ("attn.to_qkv.weight", "attn.to_qkv.bias")
_TOP_KEYS: Mapping[str, str] = {
    "patch_embedding.weight": "embeddings.patch_embedding.weight",
    "cls_embedding": "embeddings.class_embedding",
    "pos_embedding": "embeddings.position_embedding.weight",
    "pre_norm.weight": "pre_layrnorm.weight",
    "pre_norm.bias": "pre_layrnorm.bias",
    "post_norm.weight": "post_layernorm.weight",
    "post_norm.bias": "post_layernorm.bias",
}
_SKIPPED_TOP_KEYS = ("head",)  # the [C, 1024] projection after pooling: unused by Wan
_BLOCK_RE = re.compile(r"transformer\.(\d+)\.(.+)")


def clip_vision_config(**overrides) -> CLIPVisionConfig:
    """The full ViT-H/14 vision config, with `overrides` (any `CLIPVisionConfig` field)."""
    return CLIPVisionConfig(**{**CLIP_VIT_H_14, **overrides})


def tiny_clip_config(**overrides) -> CLIPVisionConfig:
    """A CPU-sized tower: width 32, 3 blocks, 4 heads, 28 px images of 14 px patches (5 tokens)."""
    tiny = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                image_size=28, projection_dim=16)
    return clip_vision_config(**{**tiny, **overrides})


def _split_qkv(out: dict[str, torch.Tensor], prefix: str, name: str, value: torch.Tensor) -> None:
    """Split `to_qkv` rows [q; k; v] ([3C, C] or [3C]) into q/k/v_proj under `prefix`."""
    suffix = name.rsplit(".", 1)[1]
    for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
        out[f"{prefix}self_attn.{proj}.{suffix}"] = part


def convert_wan_clip_visual_state_dict(
    sd: Mapping[str, torch.Tensor], drop_last_block: bool = True
) -> dict[str, torch.Tensor]:
    """Map the official Wan2.1 CLIP state dict's `visual.*` onto `CLIPVisionModel` keys.

    Args:
        sd: the official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` dict
            (`visual.*`, `textual.*`, `log_scale`); only `visual.*` is converted.
        drop_last_block: leave out the last block (unused by Wan), for a model built with
            `num_hidden_layers - 1` layers.
    Returns:
        transformers keys -> tensors (views of the inputs, no copies).
    Raises:
        ValueError: naming an unknown `visual.*` key or a missing one.
    """
    visual = {k[len(_VISUAL):]: v for k, v in sd.items() if k.startswith(_VISUAL)}
    blocks = {int(m.group(1)) for m in map(_BLOCK_RE.fullmatch, visual) if m is not None}
    num_blocks = max(blocks, default=-1) + 1
    expected = list(_TOP_KEYS) + list(_SKIPPED_TOP_KEYS) + [
        f"transformer.{i}.{name}" for i in range(num_blocks) for name in (*_BLOCK_KEYS, *_QKV_KEYS)
    ]
    missing = [k for k in expected if k not in visual]
    if missing:
        raise ValueError(f"missing key in the Wan CLIP state dict: {_VISUAL + missing[0]!r}")
    out: dict[str, torch.Tensor] = {}
    for key, value in visual.items():
        match = _BLOCK_RE.fullmatch(key)
        if key == "cls_embedding":
            out[_TOP_KEYS[key]] = value.reshape(value.shape[-1])  # [1, 1, C] -> [C]
        elif key == "pos_embedding":
            out[_TOP_KEYS[key]] = value[0]  # [1, L, C] -> [L, C]
        elif key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif key in _SKIPPED_TOP_KEYS:
            continue
        elif match is None or match.group(2) not in (*_BLOCK_KEYS, *_QKV_KEYS):
            raise ValueError(f"unknown key in the Wan CLIP state dict: {_VISUAL + key!r}")
        elif drop_last_block and int(match.group(1)) == num_blocks - 1:
            continue
        elif match.group(2) in _QKV_KEYS:
            _split_qkv(out, f"encoder.layers.{match.group(1)}.", match.group(2), value)
        else:
            out[f"encoder.layers.{match.group(1)}.{_BLOCK_KEYS[match.group(2)]}"] = value
    logger.info(
        "Wan CLIP: converted %d visual blocks%s; skipped visual.head and %d non-visual keys",
        num_blocks, " (the last one left out: unused)" if drop_last_block else "",
        len(sd) - len(visual),
    )
    return out


def preprocess_images(images: torch.Tensor, image_size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """Wan's CLIP preprocessing: bicubic resize, [-1, 1] -> [0, 1], OpenAI CLIP normalisation.

    Args:
        images: [B, 3, H, W] pixels in [-1, 1].
    Returns:
        [B, 3, S, S] float32, S = image_size.
    """
    x = F.interpolate(images.float(), size=(image_size, image_size), mode="bicubic",
                      align_corners=False)
    x = x * 0.5 + 0.5
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class WanCLIPEncoder(nn.Module):
    """Frozen CLIP vision tower cut before its last block: images -> tokens [B, L, C]."""

    def __init__(self, model: CLIPVisionModel):
        """`model` must already be the truncated tower (its last layer is Wan's block 31)."""
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "WanCLIPEncoder":
        """Frozen: always stays in eval mode."""
        return super().train(False)

    @classmethod
    def from_official(
        cls,
        checkpoint: str | os.PathLike,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        config: CLIPVisionConfig | None = None,
    ) -> "WanCLIPEncoder":
        """Load the official CLIP `.pth` (memory-mapped); `config` is the FULL tower's."""
        config = config or clip_vision_config()
        logger.info("loading Wan CLIP from %s", checkpoint)
        sd = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
        num_blocks = len({k.split(".")[2] for k in sd if k.startswith(_VISUAL + "transformer.")})
        if num_blocks != config.num_hidden_layers:
            raise ValueError(
                f"Wan CLIP checkpoint {checkpoint} has {num_blocks} visual blocks, "
                f"config.num_hidden_layers is {config.num_hidden_layers}"
            )
        cut = CLIPVisionConfig(**{**config.to_dict(), "num_hidden_layers": num_blocks - 1})
        model, info = CLIPVisionModel.from_pretrained(
            None, config=cut, state_dict=convert_wan_clip_visual_state_dict(sd),
            dtype=dtype, output_loading_info=True,
        )
        check_loading_info(info, f"Wan CLIP checkpoint {checkpoint}")
        return cls(model.to(device))

    @classmethod
    def from_hf_dir(
        cls,
        model_dir: str | os.PathLike,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
        drop_last_block: bool = True,
    ) -> "WanCLIPEncoder":
        """Load a transformers CLIP vision directory (local files only).

        `drop_last_block=True` when the directory holds the full tower (its last layer's
        weights are then skipped); False when it was saved already cut (e.g. from this class).
        """
        config = CLIPVisionConfig.from_pretrained(model_dir, local_files_only=True)
        last = config.num_hidden_layers - 1
        if drop_last_block:
            config.num_hidden_layers = last
            logger.info("Wan CLIP: skipping layer %d of %s (unused)", last, model_dir)
        model, info = CLIPVisionModel.from_pretrained(
            model_dir, config=config, dtype=dtype, local_files_only=True, output_loading_info=True
        )
        skipped = f"encoder.layers.{last}." if drop_last_block else ""
        check_loading_info(info, f"CLIP directory {model_dir}", allowed_unexpected=skipped)
        return cls(model.to(device))

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: [B, 3, H, W] in [-1, 1], any H, W (resized to S x S).
        Returns:
            [B, L, C] penultimate-block tokens in the model dtype.
        """
        param = self.model.embeddings.patch_embedding.weight
        x = preprocess_images(images.to(param.device), self.image_size)  # [B, 3, S, S]
        return self.model(pixel_values=x.to(param.dtype)).last_hidden_state

    forward = encode
