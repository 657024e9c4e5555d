"""The demo's tiny VAE, calibrated to its data so that latents carry what the frames show.

A randomly initialised VAE maps every frame to nearly the same latent plus a pattern fixed by
position (biases and border effects of its convolutions): on the demo's clips 99% of the pixel
variance differs from clip to clip, but after the random encoder and Wan's normalisation the
latents vary across clips by ~1e-4 of the flow-matching noise variance, so no conditioning (least of
all a subject reference) can lower the loss measurably, and a run cannot show that its reference
paths learn.

`calibrate_tiny_vae` keeps the encoder and replaces its 1x1 `quant_conv` rows of the posterior mean:
the 16 latent channels become the directions of the encoder's 2 x 16 output features along which
the given clips differ most from each other relative to the fixed pattern (a generalised eigenproblem
of the across-clip against the total covariance), scaled so that the normalised latents have zero
mean and unit variance. The inverse (least squares on the same data) is folded into
`post_quant_conv`, so the decoder sees what it saw before. Everything else stays: the architecture,
the on-disk diffusers format, Wan's normalisation in model/encoders/vae.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

log = logging.getLogger(__name__)
RIDGE = 1e-6
"""Relative ridge on the total covariance (a random encoder's features can be nearly collinear)."""


def across_clip_share(latents: torch.Tensor) -> float:
    """latents [N, C, F, h, w] of N clips: the share of their variance that differs between clips
    (1 - the share of the per-position mean over clips)."""
    return float(latents.var(0, unbiased=False).mean() / latents.var(unbiased=False))


@torch.no_grad()
def encoder_features(model, videos: Iterable[torch.Tensor]) -> torch.Tensor:
    """The encoder outputs (`quant_conv`'s input) of each video: [N, P, 2Z], P latent positions."""
    feats = []
    hook = model.quant_conv.register_forward_hook(lambda mod, args, out: feats.append(args[0]))
    try:
        for video in videos:
            model.encode(video.float())
    finally:
        hook.remove()
    return torch.cat([f.flatten(2).transpose(1, 2) for f in feats]).double()


@torch.no_grad()
def calibrate_tiny_vae(vae_dir: Path, videos: Iterable[torch.Tensor]) -> dict[str, float]:
    """Rewrite the diffusers AutoencoderKLWan in `vae_dir` in place (module docstring). videos:
    [1, 3, T, H, W] in [-1, 1], all the same size (at least two clips). Returns the latents'
    across-clip variance share before and after."""
    from diffusers import AutoencoderKLWan  # noqa: PLC0415

    from model.encoders.vae import WAN_VAE_LATENT_MEAN, WAN_VAE_LATENT_STD  # noqa: PLC0415
    model = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=torch.float32, local_files_only=True).eval()
    h = encoder_features(model, videos)                                   # [N, P, D]
    n, p, d = h.shape
    if n < 2:
        raise ValueError("calibrating the tiny VAE needs at least two clips")
    q, pq, z = model.quant_conv, model.post_quant_conv, model.config.z_dim
    w_old, b_old = q.weight[:z, :, 0, 0, 0].double(), q.bias[:z].double()
    mu_old = h @ w_old.T + b_old                                          # [N, P, Z]
    wan_mean, wan_std = torch.tensor(WAN_VAE_LATENT_MEAN).double(), torch.tensor(WAN_VAE_LATENT_STD).double()
    share_before = float(((mu_old - mu_old.mean(0)) ** 2).mean() / ((mu_old - mu_old.mean((0, 1))) ** 2).mean())

    flat = h.reshape(-1, d)
    centre = flat.mean(0)
    total = torch.cov(flat.T, correction=0)
    across = torch.cov((h - h.mean(0)).reshape(-1, d).T, correction=0)
    total = total + RIDGE * total.diagonal().mean() * torch.eye(d, dtype=total.dtype)
    # maximise w' across w / w' total w: whiten by the total covariance, then eigh
    evals, evecs = torch.linalg.eigh(total)
    whiten = evecs / evals.sqrt()                                         # total^(-1/2) columns
    shares, dirs = torch.linalg.eigh(whiten.T @ across @ whiten)
    w_new = (whiten @ dirs[:, -z:].flip(1)).T                             # [Z, D], unit total variance
    w_new = w_new * wan_std[:, None]                                      # normalised latents ~ N(0, 1)
    b_new = wan_mean - w_new @ centre
    q.weight[:z] = w_new.view(z, d, 1, 1, 1).float()
    q.bias[:z] = b_new.float()

    # the decoder's input: the old posterior mean, from the new one by least squares
    mu_new = (h @ w_new.T + b_new).reshape(-1, z)
    design = torch.cat([mu_new, torch.ones(len(mu_new), 1, dtype=mu_new.dtype)], 1)
    fit = torch.linalg.lstsq(design, mu_old.reshape(-1, z)).solution      # [Z + 1, Z]
    a, c = fit[:z].T, fit[z]                                              # mu_old ~ a mu_new + c
    w_pq, b_pq = pq.weight[:, :, 0, 0, 0].double(), pq.bias.double()
    pq.weight[:, :, 0, 0, 0] = (w_pq @ a).float()
    pq.bias[:] = (w_pq @ c + b_pq).float()
    model.save_pretrained(str(vae_dir))
    share_after = float(shares[-z:].mean())
    log.info("tiny VAE calibrated on %d clips: across-clip share of the latent variance %.4f -> %.4f",
             n, share_before, share_after)
    return {"across_clip_share_before": share_before, "across_clip_share_after": share_after}
