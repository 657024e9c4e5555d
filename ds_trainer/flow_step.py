"""From a data batch to the flow-matching loss of the subject-reference generator.

`inputs_from_batch` turns an OpenS2VBatch (raw pixels: the frozen encoders run, no grad; or
cached encoder outputs) into the latents and the model's `Conditioning`. `flow_matching_loss`
noises the latents at timesteps drawn from the shifted grid and regresses the velocity eps - x0 (MSE).
On the block-causal generator (`causal=`) it trains as Self-Forcing's causal diffusion trainer:
one timestep per block (`block_sigmas`), t [B, F], the block-causal mask, and optionally teacher
forcing (the clean latents as the [clean | noisy] prefix).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from data.batch import OpenS2VBatch
from data.encode import encode_batch
from model.causal import CausalConfig, frame_blocks
from model.conditioning import Conditioning
from model.flow_matching import FlowMatchingScheduler


@dataclass
class FlowInputs:
    """latents [B, 16, F, h, w] to noise; cond: text + references (layout in model/conditioning.py)."""

    latents: torch.Tensor
    cond: Conditioning


def inputs_from_batch(batch: OpenS2VBatch, encoders, device: torch.device, use_clip: bool) -> FlowInputs:
    """The model inputs of a raw batch (`encoders` required: they run here) or of a cached one
    (`encoders` may be None). Reference token lengths come from `batch.ref_counts`."""
    if batch.encoded is None:
        if encoders is None:
            raise ValueError("a raw OpenS2V batch needs the frozen encoders (or train from cache_dir)")
        enc = encode_batch(encoders, batch, clip=use_clip)
    else:
        enc = batch.encoded
        if use_clip and enc.ref_clip is None:
            raise ValueError("the model has a CLIP reference path but the cache holds no CLIP tokens "
                             "(set encoders.clip when building the cache, or train_clip_path: false)")
    counts = batch.ref_counts.to(device)
    hr, wr = enc.ref_vae.shape[-2:]
    cond = Conditioning(enc.context.to(device), enc.context_lens.to(device),
                        ref_vae=enc.ref_vae.to(device), ref_vae_lens=counts * hr * wr)
    if use_clip:
        cond = cond.replace(ref_clip=enc.ref_clip.to(device), ref_clip_lens=counts * enc.ref_clip.shape[2])
    return FlowInputs(enc.latents.to(device), cond)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """Noise and timesteps drawn from (seed, step, micro-batch, rank) alone: a resumed run and
    every ZeRO stage see exactly the same draws, whatever RNG state came before."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def block_sigmas(scheduler: FlowMatchingScheduler, batch: int, num_frames: int, causal: CausalConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """Per-frame sigmas [B, F] with one draw per block (model.causal.frame_blocks; with
    independent_first_frame frame 0 is its own block): every frame of a block shares its sigma."""
    blocks = frame_blocks(num_frames, causal)
    per_block = scheduler.sample_sigmas(batch, generator=generator, frames=len(blocks))  # [B, blocks]
    return torch.cat([per_block[:, i:i + 1].expand(-1, end - start) for i, (start, end) in enumerate(blocks)], dim=1)


def flow_matching_loss(model, inputs: FlowInputs, scheduler: FlowMatchingScheduler,
                       generator: torch.Generator, causal: Optional[CausalConfig] = None,
                       teacher_forcing: bool = False) -> torch.Tensor:
    """MSE between the predicted and the true velocity eps - x0 at a random shifted timestep.

    Without `causal`: one timestep per sample (t [B]). With `causal` (a CausalWanModel): one per
    block (t [B, F], `block_sigmas`) under the block-causal mask; `teacher_forcing` passes the clean
    latents as `clean_x` (clean timestep 0) and the loss covers the noisy frames the model returns.
    Every draw comes from `generator` (sigmas first, then the noise)."""
    if teacher_forcing and causal is None:
        raise ValueError("teacher_forcing needs the block-causal generator (causal=)")
    x0 = inputs.latents
    if causal is None:
        sigma = scheduler.sample_sigmas(x0.shape[0], generator=generator).to(x0.device)
    else:
        sigma = block_sigmas(scheduler, x0.shape[0], x0.shape[2], causal, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, sigma)
    if teacher_forcing:
        pred = model(x_t, scheduler.timestep(sigma), inputs.cond, clean_x=x0)
    else:
        pred = model(x_t, scheduler.timestep(sigma), inputs.cond)
    return F.mse_loss(pred.float(), scheduler.training_target(x0, noise).float())
