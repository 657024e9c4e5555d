"""Pixels -> frozen-encoder outputs: the one place both the raw training path and the cache
builder (data/cache.py) run the VAE, CLIP and T5, so a cached sample equals a raw one exactly."""
from __future__ import annotations

import torch

from data.batch import EncodedInputs, OpenS2VBatch


@torch.no_grad()
def encode_batch(encoders, batch: OpenS2VBatch, clip: bool) -> EncodedInputs:
    """video -> latents, subject images -> VAE latents (+ CLIP tokens if `clip`), prompts -> T5.

    Float32 results on the encoders' device, in the layout of data/batch.py."""
    vae = encoders.vae
    dev = vae.model.device
    latents = vae.encode(batch.video.to(dev, vae.dtype)).float()
    b, r = batch.subject_images.shape[:2]
    images = batch.subject_images.flatten(0, 1).to(dev, vae.dtype)  # [B*R, 3, Hs, Ws]: the encoders' input
    ref_vae = vae.encode(images[:, :, None])[:, :, 0].float().unflatten(0, (b, r))  # one-frame videos
    ref_clip = encoders.clip.encode(images).float().unflatten(0, (b, r)) if clip else None
    context, lens = encoders.t5.encode(batch.prompts)
    return EncodedInputs(latents, context.float(), lens.to(context.device), ref_vae, ref_clip)
