"""Typed Wan2.1 architecture configs and the presets (tiny, 1.3B, 14B).

Shape glossary used across `model/`: B batch, C channels, F latent frames, H W latent grid
(pixels / 8), L tokens (F * H/2 * W/2 after the (1, 2, 2) patch), N heads, D head dim (dim / N),
R reference images, K key tokens of a cross-attention path.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from model.typed_config import ConfigError, from_mapping

T5_TOKENS = 512          # Wan zero-pads every T5 context to this length before text_embedding
T5_DIM = 4096            # umT5-XXL hidden size
CLIP_TOKENS = 257        # ViT-H/14 at 224px: 16 * 16 patches + 1 class token
CLIP_DIM = 1280          # ViT-H/14 width
VAE_Z_DIM = 16           # Wan VAE latent channels
I2V_MASK_CHANNELS = 4    # first-frame mask, one channel per pixel frame of a latent frame
VAE_STRIDE = (4, 8, 8)   # (time, height, width) compression of the Wan VAE
MODEL_TYPES = ("t2v", "i2v")


@dataclass
class ReferencePathsConfig:
    """Subject-reference cross-attention paths (the OpenS2V adapters). All off = plain Wan."""

    clip: bool = False
    """CLIP path: model-level `clip_proj` (1280 -> dim) + per-block `k_img`, `v_img`, `norm_k_img`
    (Wan's I2V names, so I2V weights load into it). Not allowed on an i2v model, whose `k_img`
    path already carries the first frame's CLIP tokens."""
    vae: bool = False
    """VAE path: model-level `vae_proj` (16 -> dim per latent position) + per-block `k_vae`,
    `v_vae`, `norm_k_vae`."""
    fused: bool = False
    """Fused path: per-block `k_fused`, `v_fused`, `norm_k_fused` over [CLIP tokens | VAE tokens];
    needs both `clip` and `vae`."""

    def __post_init__(self):
        if self.fused and not (self.clip and self.vae):
            raise ConfigError("reference_paths.fused needs reference_paths.clip and reference_paths.vae")

    @property
    def any(self) -> bool:
        return self.clip or self.vae or self.fused


@dataclass
class WanConfig:
    """Wan2.1 DiT hyper-parameters. Defaults are those config.json omits (upstream.md §1.2)."""

    model_type: str = "t2v"
    """'t2v' or 'i2v' (i2v: in_dim 36 = noise 16 | mask 4 | image latent 16, and `img_emb`)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch of the Conv3d patch embedding."""
    text_len: int = T5_TOKENS
    """Text tokens after zero-padding (the pads are attended, as upstream)."""
    in_dim: int = VAE_Z_DIM
    """Input latent channels (36 for i2v)."""
    dim: int = 2048
    """Hidden size."""
    ffn_dim: int = 8192
    """FFN hidden size."""
    freq_dim: int = 256
    """Sinusoidal timestep embedding size."""
    text_dim: int = T5_DIM
    """Text encoder hidden size."""
    clip_dim: int = CLIP_DIM
    """CLIP token width fed to `img_emb` / `clip_proj` (1280 for ViT-H/14; tiny for tests)."""
    out_dim: int = VAE_Z_DIM
    """Output latent channels."""
    num_heads: int = 16
    """Attention heads; head dim = dim / num_heads (128 for every released model)."""
    num_layers: int = 32
    """Transformer blocks."""
    window_size: tuple[int, int] = (-1, -1)
    """Local attention window of the official code; only (-1, -1) (global) is supported."""
    qk_norm: bool = True
    """RMSNorm over the full dim on q and k of every attention."""
    cross_attn_norm: bool = True
    """Affine LayerNorm `norm3` before the cross-attention (else Identity)."""
    eps: float = 1e-6
    """Epsilon of every norm."""
    reference_paths: ReferencePathsConfig = field(default_factory=ReferencePathsConfig)
    """Subject-reference adapters (not part of the official config.json)."""
    attn_backend: Optional[str] = None
    """Attention backend name (see kernels.attention); None = $WANSPEED_ATTN_BACKEND or sdpa."""
    fused_qk_norm_rope: bool = False
    """Self-attention q/k RMSNorm + RoPE through the ninja-built extension (kernels/qk_norm_rope.py;
    falls back to PyTorch with a logged reason where it cannot be built). Same numerics."""

    def __post_init__(self):
        if isinstance(self.reference_paths, dict):
            self.reference_paths = from_mapping(ReferencePathsConfig, self.reference_paths, "WanConfig",
                                                "reference_paths")
        self.patch_size = tuple(self.patch_size)
        self.window_size = tuple(self.window_size)
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"must be one of {MODEL_TYPES}, got {self.model_type!r}", key="model_type")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})", key="num_heads")
        if self.head_dim % 2:
            raise ConfigError(f"head dim dim/num_heads = {self.head_dim} must be even for RoPE", key="num_heads")
        if self.window_size != (-1, -1):
            raise ConfigError(f"{self.window_size} is not supported; use (-1, -1)", key="window_size")
        expected_in = VAE_Z_DIM + I2V_MASK_CHANNELS + VAE_Z_DIM if self.model_type == "i2v" else None
        if expected_in is not None and self.in_dim != expected_in:
            raise ConfigError(f"must be {expected_in} for model_type 'i2v', got {self.in_dim}", key="in_dim")
        if self.model_type == "i2v" and self.reference_paths.clip:
            raise ConfigError("not supported on an i2v model: its k_img/v_img path already carries the first "
                              "frame's CLIP tokens", key="reference_paths.clip")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_img_path(self) -> bool:
        """Blocks carry `k_img`, `v_img`, `norm_k_img` (i2v, or the CLIP reference path)."""
        return self.model_type == "i2v" or self.reference_paths.clip

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "WanConfig":
        """Build from a dict (an official config.json or our YAML); unknown keys are errors.

        diffusers bookkeeping keys (`_class_name`, `_diffusers_version`, ...) are ignored.
        """
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        return from_mapping(cls, data, where)

    @classmethod
    def from_json(cls, path: str | Path) -> "WanConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the model config: {exc}") from exc
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


WAN_TINY = WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=48, clip_dim=40, num_heads=2, num_layers=2)
"""Tiny T2V model for tests and the CPU demo: head dim 32, every code path of the real ones."""
WAN_TINY_I2V = WAN_TINY.replace(model_type="i2v", in_dim=36)
WAN_T2V_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN_T2V_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN_I2V_14B = WAN_T2V_14B.replace(model_type="i2v", in_dim=36)

PRESETS = {
    "tiny": WAN_TINY,
    "tiny-i2v": WAN_TINY_I2V,
    "t2v-1.3B": WAN_T2V_1_3B,
    "t2v-14B": WAN_T2V_14B,
    "i2v-14B": WAN_I2V_14B,
}
