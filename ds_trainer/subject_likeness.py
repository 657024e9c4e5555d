"""How close sampled videos are to their subjects, two ways.

- `colour_distance`: the Hellinger distance between the colour histogram of the subject cut-out
  (its non-white pixels) and that of every pixel of the video's frames; 0 = the same colour
  distribution, 1 = no colour in common. The frames also hold background, so even the training clip
  itself is far from 0; what it shows is the ORDER: a model that paints its subject's colours comes
  closer than one that does not. Colours are binned `bins` per RGB channel over [-1, 1]. It needs a
  decoder that reconstructs: the demo's VAE (ds_trainer/demo_vae.py) decodes 8 x 8 block averages,
  so the demo reports the real clip's VAE reconstruction beside the samples as the reachable end.
- `latent_distances`: each sample's mean squared distance to the latents of its own clip and, on
  average, to the other clips' (in the VAE's normalised latent space, so the decoder plays no part).
"""
from __future__ import annotations

import torch

WHITE = 0.9
"""A subject-image pixel with every channel above this (in [-1, 1]) is the white backdrop it was cut out on."""


def colour_histogram(pixels: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Normalised joint RGB histogram [bins**3] of pixels [N, 3] in [-1, 1]."""
    if pixels.numel() == 0:
        raise ValueError("no pixels to make a colour histogram of")
    index = ((pixels.clamp(-1, 1) + 1) / 2 * bins).long().clamp_(max=bins - 1)
    flat = (index[:, 0] * bins + index[:, 1]) * bins + index[:, 2]
    counts = torch.bincount(flat, minlength=bins ** 3).double()
    return counts / counts.sum()


def subject_pixels(subject: torch.Tensor) -> torch.Tensor:
    """The non-white pixels [N, 3] of a subject image [3, H, W] cut out on white."""
    pixels = subject.reshape(3, -1).t().float()
    kept = pixels[(pixels <= WHITE).any(dim=1)]
    if kept.shape[0] == 0:
        raise ValueError("the subject image is all white: nothing to compare colours with")
    return kept


def hellinger(p: torch.Tensor, q: torch.Tensor) -> float:
    return float(torch.sqrt((1 - torch.sqrt(p * q).sum()).clamp(min=0)))


def colour_distance(subject: torch.Tensor, video: torch.Tensor, bins: int = 8) -> float:
    """Hellinger distance between the colours of `subject` [3, H, W] (cut out on white) and of
    every pixel of `video` [3, T, H, W], both in [-1, 1]."""
    frames = video.reshape(3, -1).t().float()
    return hellinger(colour_histogram(subject_pixels(subject), bins), colour_histogram(frames, bins))


def latent_distances(samples: torch.Tensor, clips: torch.Tensor) -> tuple[float, float]:
    """(mean over i of MSE(samples[i], clips[i]), mean over i != j of MSE(samples[i], clips[j])) for
    samples and clips [N, ...] (N >= 2): whether each sample lies nearer its own clip than the others."""
    n = samples.shape[0]
    if n < 2 or clips.shape != samples.shape:
        raise ValueError(f"need N >= 2 samples shaped like their clips, got {tuple(samples.shape)} and {tuple(clips.shape)}")
    d = ((samples[:, None].double() - clips[None].double()) ** 2).flatten(2).mean(2)  # [N, N]
    own = d.diagonal().mean()
    other = (d.sum() - d.diagonal().sum()) / (n * (n - 1))
    return float(own), float(other)
