"""`wanspeed demo`: the README's main job on its embedded tiny default.

Until the trainer lands this exercises the model core end to end on CPU: build a tiny Wan with
the subject-reference paths, save it in the official diffusers layout, load it back through the
checkpoint loader (meta device + assign), and run a few-step flow-matching sampler conditioned
on text, CLIP and VAE reference tokens. Prints what it did and how long each part took.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from model.checkpoint import load_wan_model, save_diffusers_dir
from model.config import CLIP_TOKENS, WAN_TINY, ReferencePathsConfig
from model.flow_matching import FlowMatchingScheduler
from model.wan import WanModel

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="where to write the tiny checkpoint (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    parser.add_argument("--frames", type=int, default=3, help="latent frames (default 3)")
    parser.add_argument("--seed", type=int, default=0)


@torch.no_grad()
def sample(model: WanModel, scheduler: FlowMatchingScheduler, shape, steps: int, generator: torch.Generator,
           **cond) -> torch.Tensor:
    """Euler flow-matching sampler from pure noise; shape [B, C, F, H, W]."""
    x = torch.randn(shape, generator=generator)
    sigmas = scheduler.sampling_sigmas(steps)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = scheduler.timestep(s).expand(shape[0])
        flow = model(x, t, **cond)
        x = scheduler.euler_step(x, flow, s.expand(shape[0]), s_next.expand(shape[0]))
    return x


def run(args: argparse.Namespace) -> int:
    timings = {}
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    cfg = WAN_TINY.replace(reference_paths=ReferencePathsConfig(clip=True, vae=True, fused=True))
    model = WanModel(cfg)
    timings["build"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "tiny-wan"
        t0 = time.perf_counter()
        save_diffusers_dir(model, cfg, out)
        loaded, report = load_wan_model(out)
        timings["save+load"] = time.perf_counter() - t0
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    g = torch.Generator().manual_seed(args.seed)
    cond = dict(context=torch.randn(1, 12, cfg.text_dim, generator=g),
                ref_clip=torch.randn(1, CLIP_TOKENS, cfg.clip_dim, generator=g),
                ref_vae=torch.randn(1, 16, 1, 8, 8, generator=g))
    t0 = time.perf_counter()
    latents = sample(loaded, FlowMatchingScheduler(shift=5.0), (1, 16, args.frames, 8, 8), args.steps, g, **cond)
    timings["sample"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in loaded.parameters())
    print(f"tiny Wan ({n_params / 1e6:.2f}M params, reference paths clip+vae+fused) -> {report.summary()}")
    print(f"reloaded weights identical: {same}; sampled latents {tuple(latents.shape)}, "
          f"std {latents.std():.3f}, finite: {bool(torch.isfinite(latents).all())}")
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return 0 if same and bool(torch.isfinite(latents).all()) else 1
