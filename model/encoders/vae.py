"""Wan2.1 video VAE, wrapped from diffusers' `AutoencoderKLWan`.

The official single-file weights (`Wan2.1_VAE.pth`, keys `encoder.*`, `conv1.*`, `conv2.*`,
`decoder.*`) are mapped with diffusers' own `convert_wan_vae_to_diffusers`, checked key by key
against the model. Encoding is causal in time: frames go in chunks 1, 4, 4, ..., so T = 1 + 4k
pixel frames give F = 1 + k latent frames; space shrinks 8x. Latents are the posterior mean,
normalised per channel with Wan's statistics (no sampling), as the DiT was trained on.

Shapes: B videos, T pixel frames, H W pixels, F = 1 + (T - 1) / 4 latent frames,
h = H / 8, w = W / 8, Z = VAE_Z_DIM (16) latent channels.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from torch import nn

from model.config import VAE_Z_DIM

logger = logging.getLogger(__name__)

WAN_VAE_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
"""Per-channel mean of Wan2.1 VAE latents (`z_norm = (mu - mean) / std`)."""
WAN_VAE_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

WAN_VAE: Mapping[str, object] = dict(
    base_dim=96,
    z_dim=VAE_Z_DIM,
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=2,  # diffusers' converter hard-codes the block indices this gives
    attn_scales=(),
    temperal_downsample=(False, True, True),
    latents_mean=WAN_VAE_LATENT_MEAN,
    latents_std=WAN_VAE_LATENT_STD,
)
"""diffusers `AutoencoderKLWan` arguments of the official Wan2.1 VAE."""


def wan_vae_config(**overrides) -> dict:
    """`AutoencoderKLWan` keyword arguments (lists, as diffusers stores them) + `overrides`."""
    cfg = {**WAN_VAE, **overrides}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def tiny_vae_config(**overrides) -> dict:
    """A CPU-sized VAE: the official layout with base width 8 instead of 96 (blocks unchanged)."""
    return wan_vae_config(**{"base_dim": 8, **overrides})


def _build_on_meta(config: Mapping[str, object]) -> AutoencoderKLWan:
    """An `AutoencoderKLWan` whose parameters take no memory until loaded with assign=True."""
    with torch.device("meta"):
        return AutoencoderKLWan(**config)


def convert_wan_vae_state_dict(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, object] | None = None
) -> dict[str, torch.Tensor]:
    """Map the official Wan2.1 VAE state dict onto `AutoencoderKLWan(**config)` keys.

    Args:
        sd: official `WanVAE_` keys (`encoder.*`, `conv1.*`, `conv2.*`, `decoder.*`).
        config: `AutoencoderKLWan` arguments; the official ones by default.
    Returns:
        diffusers keys -> the same tensors (no copies).
    Raises:
        ValueError: naming keys the model lacks (diffusers' converter passes unknown keys
            through unchanged, so these are the official names), keys it needs that the
            checkpoint lacks, or tensors of the wrong shape.
    """
    out = convert_wan_vae_to_diffusers(dict(sd))
    expected = {k: v.shape for k, v in _build_on_meta(config or wan_vae_config()).state_dict().items()}
    unexpected = sorted(set(out) - set(expected))
    if unexpected:
        raise ValueError(f"unknown key in the Wan VAE state dict: {unexpected[:5]} "
                         f"({len(unexpected)} in all)")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"Wan VAE state dict lacks (diffusers names): {missing[:5]} "
                         f"({len(missing)} in all)")
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k])}"
             for k, v in out.items() if v.shape != expected[k]]
    if wrong:
        raise ValueError(f"Wan VAE state dict has wrong shapes (diffusers names): {wrong[:5]}")
    return out


class WanVAE(nn.Module):
    """Frozen Wan2.1 VAE: video [B, 3, T, H, W] <-> normalised latents [B, Z, F, h, w]."""

    def __init__(self, model: AutoencoderKLWan):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        z_dim = model.config.z_dim
        # Wan's statistics, not the config's: a diffusers dir may carry others (or none).
        mean, std = torch.tensor(WAN_VAE_LATENT_MEAN), torch.tensor(WAN_VAE_LATENT_STD)
        if mean.numel() != z_dim:
            raise ValueError(f"Wan VAE statistics have {mean.numel()} channels, "
                             f"model.config.z_dim is {z_dim}")
        self.register_buffer("latent_mean", mean.view(1, z_dim, 1, 1, 1), persistent=False)
        self.register_buffer("latent_std", std.view(1, z_dim, 1, 1, 1), persistent=False)
        self.temporal_stride = 2 ** sum(model.config.temperal_downsample)
        self.spatial_stride = 2 ** (len(model.config.dim_mult) - 1)

    def train(self, mode: bool = True) -> "WanVAE":
        """Frozen: always stays in eval mode."""
        return super().train(False)

    @classmethod
    def from_official(
        cls,
        checkpoint: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        config: Mapping[str, object] | None = None,
    ) -> "WanVAE":
        """Load `Wan2.1_VAE.pth` (memory-mapped) into a model built on the meta device."""
        config = config or wan_vae_config()
        logger.info("loading Wan VAE from %s", checkpoint)
        sd = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
        model = _build_on_meta(config)
        sd = {k: v.to(dtype) for k, v in convert_wan_vae_state_dict(sd, config).items()}
        model.load_state_dict(sd, strict=True, assign=True)  # takes the (mapped) tensors as is
        return cls(model.to(device))

    @classmethod
    def from_hf_dir(
        cls,
        model_dir: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "WanVAE":
        """Load a diffusers `AutoencoderKLWan` directory (e.g. `<Wan2.1-*-Diffusers>/vae`)."""
        model = AutoencoderKLWan.from_pretrained(model_dir, torch_dtype=dtype, local_files_only=True)
        return cls(model.to(device))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _check_video(self, video: torch.Tensor) -> None:
        t, h, w = video.shape[2:] if video.ndim == 5 else (0, 0, 0)
        if (video.ndim != 5 or video.shape[1] != 3 or (t - 1) % self.temporal_stride
                or h % self.spatial_stride or w % self.spatial_stride):
            raise ValueError(
                f"video must be [B, 3, T, H, W] with T = 1 + {self.temporal_stride}k and H, W "
                f"multiples of {self.spatial_stride}; got {tuple(video.shape)}"
            )

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode a video to normalised latents.

        Args:
            video: [B, 3, T, H, W] in [-1, 1], T = 1 + 4k (T = 1 for an image).
        Returns:
            [B, Z, F, h, w] float32, `(mu - mean) / std` per channel.
        """
        self._check_video(video)
        x = video.to(device=self.latent_mean.device, dtype=self.dtype)
        mu = self.model.encode(x).latent_dist.mode()  # [B, Z, F, h, w], the posterior mean
        return (mu.float() - self.latent_mean) / self.latent_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents.

        Args:
            latents: [B, Z, F, h, w] as returned by `encode`.
        Returns:
            [B, 3, 1 + 4 (F - 1), 8 h, 8 w] float32 in [-1, 1].
        """
        z = latents.to(self.latent_mean.device).float() * self.latent_std + self.latent_mean
        video = self.model.decode(z.to(self.dtype)).sample
        return video.float().clamp(-1.0, 1.0)
