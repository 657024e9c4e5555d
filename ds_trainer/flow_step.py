"""From a data batch to the flow-matching loss of the subject-reference generator.

`inputs_from_raw` runs the frozen encoders (no grad) on an OpenS2V batch; `inputs_from_cache`
reads the same tensors from an encoder-cache batch. `flow_matching_loss` noises the latents at
timesteps drawn from the shifted grid and regresses the velocity eps - x0 (MSE).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from model.flow_matching import FlowMatchingScheduler


@dataclass
class FlowInputs:
    """latents [B, 16, F, h, w]; context [B, L, C] + context_lens [B]; ref_vae [B, 16, R, hr, wr]
    + ref_vae_lens [B]; ref_clip [B, R*K, C] + ref_clip_lens [B] (None without a CLIP path)."""

    latents: torch.Tensor
    context: torch.Tensor
    context_lens: torch.Tensor
    ref_vae: torch.Tensor
    ref_vae_lens: torch.Tensor
    ref_clip: Optional[torch.Tensor] = None
    ref_clip_lens: Optional[torch.Tensor] = None

    def model_kwargs(self) -> dict:
        kw = dict(context=self.context, context_lens=self.context_lens, ref_vae=self.ref_vae,
                  ref_vae_lens=self.ref_vae_lens)
        if self.ref_clip is not None:
            kw.update(ref_clip=self.ref_clip, ref_clip_lens=self.ref_clip_lens)
        return kw


def _refs(ref_vae: torch.Tensor, ref_clip: Optional[torch.Tensor], counts: torch.Tensor):
    """[B, R, 16, 1, hr, wr] and [B, R, K, C] -> model layout plus per-sample token counts."""
    b, r, c, _, hr, wr = ref_vae.shape
    vae = ref_vae[:, :, :, 0].permute(0, 2, 1, 3, 4)  # [B, 16, R, hr, wr]
    vae_lens = counts * hr * wr
    clip = clip_lens = None
    if ref_clip is not None:
        k = ref_clip.shape[2]
        clip, clip_lens = ref_clip.flatten(1, 2), counts * k  # [B, R*K, C]
    return vae, vae_lens, clip, clip_lens


@torch.no_grad()
def inputs_from_raw(batch, encoders, device: torch.device, use_clip: bool) -> FlowInputs:
    """Encode an OpenS2VBatch: video -> latents, subjects -> VAE + CLIP tokens, prompts -> T5."""
    vae = encoders.vae
    latents = vae.encode(batch.video.to(device, vae.dtype)).float()
    b, r = batch.subject_images.shape[:2]
    subjects = batch.subject_images.flatten(0, 1).to(device, vae.dtype)  # [B*R, 3, Hs, Ws]
    ref_vae = vae.encode(subjects[:, :, None]).float().unflatten(0, (b, r))
    ref_clip = encoders.clip.encode(subjects).float().unflatten(0, (b, r)) if use_clip else None
    context, lens = encoders.t5.encode(batch.prompts)
    vae_t, vae_lens, clip_t, clip_lens = _refs(ref_vae, ref_clip, batch.subject_counts.to(device))
    return FlowInputs(latents, context.float().to(device), lens.to(device), vae_t, vae_lens, clip_t, clip_lens)


def inputs_from_cache(batch: dict, device: torch.device, use_clip: bool) -> FlowInputs:
    """A `collate_cached_batch` batch (one subject count R for all samples of the cache)."""
    ref_vae = batch["ref_vae"].to(device)
    counts = torch.full((ref_vae.shape[0],), ref_vae.shape[1], device=device)
    if use_clip and "ref_clip" not in batch:
        raise ValueError("the model has a CLIP reference path but the cache holds no CLIP tokens "
                         "(set encoders.clip when building the cache, or train_clip_path: false)")
    clip = batch["ref_clip"].to(device) if use_clip else None
    vae_t, vae_lens, clip_t, clip_lens = _refs(ref_vae, clip, counts)
    return FlowInputs(batch["latents"].to(device), batch["context"].to(device), batch["context_lens"].to(device),
                      vae_t, vae_lens, clip_t, clip_lens)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """Noise and timesteps drawn from (seed, step, micro-batch, rank) alone: a resumed run and
    every ZeRO stage see exactly the same draws, whatever RNG state came before."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def flow_matching_loss(model, inputs: FlowInputs, scheduler: FlowMatchingScheduler,
                       generator: torch.Generator) -> torch.Tensor:
    """MSE between the predicted and the true velocity eps - x0 at a random shifted timestep."""
    x0 = inputs.latents
    sigma = scheduler.sample_sigmas(x0.shape[0], generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, sigma)
    pred = model(x_t, scheduler.timestep(sigma), **inputs.model_kwargs())
    return F.mse_loss(pred.float(), scheduler.training_target(x0, noise).float())
