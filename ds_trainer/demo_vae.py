"""The demo's tiny VAE: a diffusers `AutoencoderKLWan` whose weights are SET, not random, so that
its latents are the clip's colours and its decoder paints them back.

A randomly initialised VAE is useless for a demo twice over. Its encoder maps every frame to nearly
the same latent (on the demo clips, the across-clip part of the latent variance is ~1e-4 of the
flow-matching noise), so no conditioning can lower the loss measurably; and its decoder is random,
so even a real clip's latents decode to noise and a sampled video cannot show its subject.

`build_colour_vae` keeps the architecture and the on-disk format (the tiny config of
model/encoders/vae.py, loaded by the same code as the official VAE) and sets every weight:

- encoder: each latent cell is the mean colour of its 8 x 8 pixel patch, over the frames it covers
  (frame 0 alone, then 4 frames per latent frame, as Wan's causal VAE groups them). `conv_in` copies
  RGB, every 2D downsample averages 2 x 2, every temporal downsample averages 2 frames, and every
  residual branch and the attention are zeroed so the blocks pass their input on.
- the two places a nonlinearity cannot be zeroed away, the RMS norm + SiLU before each `conv_out`,
  are made exact: a constant channel of size `CONSTANT` dominates the norm (so it divides by about
  `CONSTANT` whatever the colour; error <= 3 / CONSTANT**2), and each colour enters twice, with the
  norm's gamma +1 and -1, because SiLU(u) - SiLU(-u) = u for every u.
- `quant_conv` whitens the three colour channels over the given clips and spreads them over all 16
  latent channels (`latent_embedding`: orthonormal directions, unit variance per channel on
  average after Wan's per-channel normalisation, model/encoders/vae.py), as a real VAE uses every
  channel: 3 colour channels beside 13 channels of zeros left most of the flow-matching loss on
  channels that carry nothing (measured: 13 of 16 channels at ~0.87 each, diluting ref_gain from
  1.34 on the colour channels to 1.10). `post_quant_conv` undoes it on the embedding's span, and the
  decoder upsamples by repeating cells (nearest-neighbour upsampling, copying convolutions, each
  temporal upsample writing its frame twice).

So decode(encode(video)) is the video's block average: 8 x 8 pixels, frame 0 and then groups of 4
frames, exact to ~1e-4. Coarse, but what the frames show survives both ways.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CONSTANT = 100.0
"""The constant channel the RMS norms see beside the colours (pixels in [-1, 1])."""
COLOURS = 3
RGB, CONST, RGB_AGAIN = slice(0, 3), 3, slice(4, 7)
"""Channel layout wherever a norm + SiLU follows: colour, the constant, the colour again (negated by gamma)."""
LOGVAR = -30.0
"""The posterior's log-variance: sampling the latent distribution gives its mean."""


def _zero(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.zero_()


def _copy(weight: torch.Tensor, tap: tuple, scale: float = 1.0) -> None:
    """weight [out, in, *kernel] := `scale` x identity on the shared channels at kernel position `tap`."""
    weight.zero_()
    n = min(weight.shape[0], weight.shape[1])
    weight[(torch.arange(n), torch.arange(n), *tap)] = scale


def _current_tap(conv) -> tuple:
    """The kernel position of a causal 3D conv that reads the current frame at the same pixel."""
    kt, kh, kw = conv.weight.shape[2:]
    return (kt - 1, kh // 2, kw // 2)


def _set_passthrough(model) -> None:
    """Every residual branch and attention adds 0; shortcuts, downsamples and upsamples copy / average."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (  # noqa: PLC0415
        WanAttentionBlock, WanResample, WanResidualBlock)
    for module in model.modules():
        if isinstance(module, WanResidualBlock):
            _zero(module.conv2)
            if not isinstance(module.conv_shortcut, torch.nn.Identity):
                _copy(module.conv_shortcut.weight, (0, 0, 0))
                module.conv_shortcut.bias.zero_()
        elif isinstance(module, WanAttentionBlock):
            _zero(module.proj)
        elif isinstance(module, WanResample) and module.mode != "none":
            conv = module.resample[-1]
            conv.bias.zero_()
            if module.mode.startswith("downsample"):  # zero-pad right / bottom, 3x3 stride 2: taps 0, 1 = 2x2 mean
                conv.weight.zero_()
                for dy in (0, 1):
                    for dx in (0, 1):
                        conv.weight[(torch.arange(conv.weight.shape[0]),) * 2 + (dy, dx)] = 0.25
            else:
                _copy(conv.weight, (1, 1))
            if hasattr(module, "time_conv"):
                tc = module.time_conv
                tc.bias.zero_()
                tc.weight.zero_()
                c = tc.weight.shape[1]
                if module.mode == "downsample3d":  # stride 2 over [previous, a, b]: the mean of a and b
                    for tap in (1, 2):
                        tc.weight[(torch.arange(c), torch.arange(c), tap, 0, 0)] = 0.5
                else:  # upsample3d: 2c outputs = two frames, both the current one
                    for half in (0, 1):
                        tc.weight[(half * c + torch.arange(c), torch.arange(c), 2, 0, 0)] = 1.0


def _set_colour_input(conv) -> None:
    """conv_in: colour into RGB and RGB_AGAIN, CONSTANT into CONST (input: RGB channels first)."""
    conv.weight.zero_()
    conv.bias.zero_()
    tap = _current_tap(conv)
    for c in range(COLOURS):
        for out in (RGB.start + c, RGB_AGAIN.start + c):
            conv.weight[(out, c, *tap)] = 1.0
    conv.bias[CONST] = CONSTANT


def _set_colour_head(norm, conv) -> None:
    """RMS norm + SiLU + conv_out that give back the colour: gamma +1 / -1 on its two copies, and
    conv_out takes the difference, times CONSTANT / sqrt(C) (the norm divided by ~CONSTANT)."""
    norm.gamma.fill_(1.0)
    norm.gamma[RGB_AGAIN] = -1.0
    scale = CONSTANT / norm.scale  # norm.scale = sqrt(channels)
    conv.weight.zero_()
    conv.bias.zero_()
    tap = _current_tap(conv)
    for c in range(COLOURS):
        conv.weight[(c, RGB.start + c, *tap)] = scale
        conv.weight[(c, RGB_AGAIN.start + c, *tap)] = -scale


def latent_embedding(z: int, seed: int = 0) -> torch.Tensor:
    """[z, 3] float64: how the whitened colours spread over the z latent channels. Orthonormal columns
    times sqrt(z / 3), so every channel carries colour (unit variance on average, as a real VAE's
    channels do) instead of 3 channels holding it and z - 3 holding zeros, which the model would
    have to learn to predict as such."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(z, COLOURS, generator=g, dtype=torch.float64))
    return q * (z / COLOURS) ** 0.5


def _encoder_colours(model, videos: Iterable[torch.Tensor]) -> torch.Tensor:
    """The encoder's colour channels for every latent cell of every video: [cells, 3] float64."""
    feats = []
    hook = model.quant_conv.register_forward_hook(lambda mod, args, out: feats.append(args[0][:, :COLOURS]))
    try:
        for video in videos:
            model.encode(video.float())
    finally:
        hook.remove()
    return torch.cat([f.transpose(0, 1).reshape(COLOURS, -1).t() for f in feats]).double()


@torch.no_grad()
def build_colour_vae(vae_dir: Path, videos: Iterable[torch.Tensor]) -> dict[str, list[float]]:
    """Set the weights of the diffusers AutoencoderKLWan in `vae_dir` in place (module docstring).
    videos: [1, 3, T, H, W] in [-1, 1] (T = 1 + 4k), whose latent colours get mean 0 and identity
    covariance. Returns the colour mean and standard deviations along the principal axes, for the log."""
    from diffusers import AutoencoderKLWan  # noqa: PLC0415

    from model.encoders.vae import WAN_VAE_LATENT_MEAN, WAN_VAE_LATENT_STD  # noqa: PLC0415
    model = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=torch.float32, local_files_only=True).eval()
    z = model.config.z_dim
    enc, dec = model.encoder, model.decoder
    if enc.conv_in.weight.shape[0] < RGB_AGAIN.stop or dec.conv_out.weight.shape[1] < RGB_AGAIN.stop:
        raise ValueError(f"the colour VAE needs base_dim >= {RGB_AGAIN.stop}, got {model.config.base_dim}")
    _set_passthrough(model)
    _set_colour_input(enc.conv_in)
    _set_colour_head(enc.norm_out, enc.conv_out)
    _copy(model.quant_conv.weight, (0, 0, 0))      # provisional: colours straight through, for the fit
    model.quant_conv.bias.zero_()

    colours = _encoder_colours(model, videos)       # [cells, 3]
    if len(colours) < 2:
        raise ValueError("building the colour VAE needs at least two latent cells of data")
    mean = colours.mean(0)
    cov = torch.cov(colours.t(), correction=0) + 1e-6 * torch.eye(COLOURS, dtype=colours.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.t()   # symmetric (ZCA) whitening
    wan_mean = torch.tensor(WAN_VAE_LATENT_MEAN, dtype=torch.float64)
    wan_std = torch.tensor(WAN_VAE_LATENT_STD, dtype=torch.float64)

    # normalised latent n = embed whiten (colour - mean); mu = wan_mean + wan_std * n (Wan's normalisation
    # then gives n back); post_quant_conv inverts it on the embedding's span
    embed = latent_embedding(z)                                       # [z, 3]
    to_latent = embed @ whiten                                        # [z, 3]
    q = model.quant_conv
    q.weight.zero_()
    q.weight[:z, :COLOURS, 0, 0, 0] = (wan_std[:, None] * to_latent).float()
    q.bias[:z] = (wan_mean - wan_std * (to_latent @ mean)).float()
    q.bias[z:] = LOGVAR
    pq = model.post_quant_conv
    pq.weight.zero_()
    from_latent = torch.linalg.inv(whiten) @ torch.linalg.pinv(embed)  # [3, z]
    pq.weight[:COLOURS, :z, 0, 0, 0] = (from_latent / wan_std[None, :]).float()
    pq.bias.zero_()
    pq.bias[:COLOURS] = (mean - from_latent @ (wan_mean / wan_std)).float()
    _set_colour_input(dec.conv_in)
    _set_colour_head(dec.norm_out, dec.conv_out)
    model.save_pretrained(str(vae_dir))
    log.info("demo VAE set: latent colours of %d cells, mean %s, std %s", len(colours),
             [round(float(v), 3) for v in mean], [round(float(v), 3) for v in evals.sqrt()])
    return {"colour_mean": [float(v) for v in mean], "colour_std": [float(v) for v in evals.sqrt()]}


def block_average(video: torch.Tensor, patch: int = 8, frames: int = 4) -> torch.Tensor:
    """What decode(encode(video)) of the colour VAE gives: video [B, 3, 1 + frames k, H, W] averaged
    over patch x patch pixels, frame 0 alone and then groups of `frames`, repeated back to full size."""
    first, rest = video[:, :, :1], video[:, :, 1:]
    parts = [F.avg_pool3d(first, (1, patch, patch))]
    if rest.shape[2]:
        parts.append(F.avg_pool3d(rest, (frames, patch, patch)))
    out = [p.repeat_interleave(n, 2) for p, n in zip(parts, (1, frames))]
    return torch.cat(out, 2).repeat_interleave(patch, 3).repeat_interleave(patch, 4)
