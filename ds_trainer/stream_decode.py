"""Decode Wan VAE latents as they arrive, block by block, with the result of one decode of them all.

The Wan VAE is causal in time: diffusers' `AutoencoderKLWan._decode` runs its decoder one latent
frame at a time through a feature cache (the causal convolutions' past inputs) that it clears
before and after. `StreamingDecoder` runs the same per-frame calls but keeps that cache between
`push` calls, so a causal generator's blocks can be written to the mp4 as they finish. This leans
on diffusers' decoder interface (`post_quant_conv`, `decoder(x, feat_cache=, feat_idx=,
first_chunk=)`, `clear_cache`, `_feat_map`); tests/ds_trainer/test_sample_causal.py checks it
against `WanVAE.decode`, so a diffusers change shows up there.
"""
from __future__ import annotations

import torch


class StreamingDecoder:
    """`push(latents [B, 16, f, h, w])` -> the pixel frames they add, [B, 3, T, H, W] in [-1, 1]
    (1 + 4 (f - 1) for the first push, 4 f after)."""

    def __init__(self, vae):
        model = vae.model
        if getattr(model.config, "patch_size", None) is not None:
            raise ValueError("streaming decode supports the Wan2.1 VAE (no patch_size), got a patchified VAE")
        if getattr(model, "use_tiling", False):
            raise ValueError("streaming decode runs without VAE tiling")
        self.vae, self.model = vae, model
        self.model.clear_cache()
        self.first = True

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        vae, model = self.vae, self.model
        z = latents.to(vae.latent_mean.device).float() * vae.latent_std + vae.latent_mean
        x = model.post_quant_conv(z.to(vae.dtype))  # a 1x1x1 convolution: frame by frame
        out = []
        for i in range(x.shape[2]):
            model._conv_idx = [0]
            out.append(model.decoder(x[:, :, i:i + 1], feat_cache=model._feat_map, feat_idx=model._conv_idx,
                                     first_chunk=self.first))
            self.first = False
        return torch.cat(out, dim=2).float().clamp(-1.0, 1.0)

    def close(self) -> None:
        self.model.clear_cache()
