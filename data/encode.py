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
    latents = vae.encode(batch.video.to(vae.model.device, vae.dtype)).float()
    ref_vae, ref_clip = encode_subjects(encoders, batch.subject_images, clip)
    context, lens = encoders.t5.encode(batch.prompts)
    return EncodedInputs(latents, context.float(), lens.to(context.device), ref_vae, ref_clip)


@torch.no_grad()
def encode_subjects(encoders, subject_images: torch.Tensor, clip: bool):
    """Subject images [B, R, 3, Hs, Ws] in [-1, 1] -> (ref_vae [B, R, 16, hs, ws], ref_clip
    [B, R, K, C] or None): each image a one-frame video through the VAE, and through CLIP if
    `clip`. Training, the cache and `wanspeed sample` all encode references here."""
    vae = encoders.vae
    b, r = subject_images.shape[:2]
    images = subject_images.flatten(0, 1).to(vae.model.device, vae.dtype)  # [B*R, 3, Hs, Ws]: the encoders' input
    ref_vae = vae.encode(images[:, :, None])[:, :, 0].float().unflatten(0, (b, r))  # one-frame videos
    ref_clip = encoders.clip.encode(images).float().unflatten(0, (b, r)) if clip else None
    return ref_vae, ref_clip


@torch.no_grad()
def encode_i2v(encoders, images: torch.Tensor, prompts: list[str], latent_frames: int):
    """Wan I2V conditioning of first frames (Wan's image2video.py): T5 context, CLIP tokens of the
    image (`clip_fea` [B, 257, C], batch axis kept: the I2V seed's §2.4), and `y` [B, 20, F, h, w]
    = [mask 4 | VAE latent of the image followed by black frames 16], the mask 1 on latent frame 0.
    images [B, 3, H, W] in [-1, 1]. Returns (Conditioning, first-frame latent [B, 16, 1, h, w]);
    the VAE is causal in time, so frame 0 of `y`'s latent is the image's own latent."""
    from model.conditioning import Conditioning  # noqa: PLC0415

    clip_fea, y = encode_first_frames(encoders, images, latent_frames)
    context, lens = encoders.t5.encode(prompts)
    cond = Conditioning(context=context.float(), context_lens=lens.to(context.device), clip_fea=clip_fea, y=y)
    return cond, y[:, 4:, :1]


def encode_first_frames(encoders, images: torch.Tensor, latent_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_fea [B, 257, C], y [B, 20, F, h, w]) of first frames images [B, 3, H, W] in [-1, 1]
    (encode_i2v without the prompt; y[:, 4:, :1] is the first frame's latent)."""
    from data.video import pixel_frames  # noqa: PLC0415

    vae = encoders.vae
    dev = vae.model.device
    b, _, h, w = images.shape
    images = images.to(dev, vae.dtype)
    video = torch.cat([images[:, :, None], images.new_zeros(b, 3, pixel_frames(latent_frames) - 1, h, w)], dim=2)
    latent = vae.encode(video).float()  # [B, 16, F, h, w]
    clip_fea = encoders.clip.encode(images).float()
    return clip_fea, i2v_y(latent)


def i2v_y(latent: torch.Tensor) -> torch.Tensor:
    """Wan I2V's y [B, 20, F, h, w] = [mask 4 | latent 16] of the first-frame video's VAE latent
    [B, 16, F, h, w]; the mask is 1 on latent frame 0 (the given image)."""
    mask = torch.zeros(latent.shape[0], 4, *latent.shape[2:], device=latent.device, dtype=latent.dtype)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1)
