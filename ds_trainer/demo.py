"""The steps of `wanspeed demo` (ds_trainer/commands/demo.py), the README's main job on its
embedded tiny default (configs/tiny_opens2v.yaml):

1. write synthetic OpenS2V-format data (real mp4s, RLE masks, backgrounds);
2. write tiny T5 / CLIP / VAE encoders and a tiny Wan base checkpoint in the official layouts
   (the VAE's weights set so that latents are the clips' colours and decode back, ds_trainer/demo_vae.py);
3. fill the encoder-output cache (`wanspeed cache`), and a cache of held-out clips (other sources);
4. measure `ref_gain` (ds_trainer/ref_gain.py) of the untrained model, train the reference adapters
   (the fused path too; LoRA is off in the tiny config) under `deepspeed` with 2 CPU ranks and
   ZeRO-3, and measure it again;
5. plot the loss curve and sample a short mp4 from the trained model.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from ds_trainer.shipped import configs_dir

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


DEMO_FRAMES = 17
"""Frames per synthetic clip: the tiny config reads 5 frames at stride 3, so 17 leave a choice of
windows and keep writing 48 clips short."""


def prepare(root: Path, clips: int = 48, seed: int = 0) -> Path:
    """Data, encoders and base weights under `root`; returns the resolved run config path."""
    from data.synthetic import make_demo_dataset  # noqa: PLC0415
    from model.checkpoint import save_diffusers_dir  # noqa: PLC0415
    from model.config import WAN_TINY  # noqa: PLC0415
    from model.encoders.bundle import write_tiny_encoders  # noqa: PLC0415
    from model.wan import WanModel  # noqa: PLC0415

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").exists():
        make_demo_dataset(root / "data", clips=clips, parts=1, frames=DEMO_FRAMES, seed=seed)
    config = root / "tiny_opens2v.yaml"
    config.write_text((configs_dir() / "tiny_opens2v.yaml").read_text().replace("@DEMO@", str(root.resolve())))
    if not (root / "encoders" / "vae").exists():
        write_tiny_encoders(root / "encoders", text_dim=WAN_TINY.text_dim, clip_dim=WAN_TINY.clip_dim, seed=seed)
        _build_vae(config, root / "encoders" / "vae")
    if not (root / "base").exists():
        torch.manual_seed(seed)
        base = WanModel(WAN_TINY)
        # Wan zero-initialises its head for pre-training; a frozen zero (or tiny) head would hide
        # whatever the adapters learn, so the demo base gets a unit-scale one.
        torch.nn.init.normal_(base.head.head.weight, std=WAN_TINY.dim ** -0.5)
        save_diffusers_dir(base, WAN_TINY, root / "base")
    return config


def _build_vae(config: Path, vae_dir: Path) -> None:
    from ds_trainer.config import load_train_config  # noqa: PLC0415
    from ds_trainer.datasets import opens2v_dataset  # noqa: PLC0415
    from ds_trainer.demo_vae import build_colour_vae  # noqa: PLC0415
    dataset = opens2v_dataset(load_train_config(config))
    build_colour_vae(vae_dir, [dataset[i]["video"][None] for i in range(len(dataset))])


def prepare_heldout(root: Path, clips: int = 24, seed: int = 1) -> Path:
    """Synthetic clips of other source videos (another seed) under `root/heldout`, and a copy of
    the demo config reading them into `root/cache_heldout`; returns that config (for `wanspeed cache`)."""
    from data.synthetic import make_demo_dataset  # noqa: PLC0415
    if not (root / "heldout").exists():
        make_demo_dataset(root / "heldout", clips=clips, parts=1, frames=DEMO_FRAMES, seed=seed)
    config = root / "heldout_opens2v.yaml"
    text = (root / "tiny_opens2v.yaml").read_text()
    config.write_text(text.replace(f"{root.resolve()}/data/", f"{root.resolve()}/heldout/")
                      .replace(f"{root.resolve()}/cache", f"{root.resolve()}/cache_heldout"))
    return config


def measure_ref_gain(config: Path, cache_dir: Path, checkpoint: Optional[Path] = None, repeats: int = 4):
    """ref_gain (ds_trainer/ref_gain.py) of the config's model on the samples of `cache_dir`: the
    untrained model (base + fresh adapters) without `checkpoint`, else base + the checkpoint."""
    from ds_trainer import ref_gain  # noqa: PLC0415
    from ds_trainer.config import load_train_config  # noqa: PLC0415
    from ds_trainer.sample import build_generator  # noqa: PLC0415
    from ds_trainer.sample_weights import base_generator  # noqa: PLC0415
    from model.flow_matching import FlowMatchingScheduler  # noqa: PLC0415
    cfg = load_train_config(config)
    model = (build_generator(cfg, checkpoint, str(config)) if checkpoint is not None
             else base_generator(cfg, cfg.wan_config()).eval())
    samples, keys = ref_gain.cached_samples(cache_dir, model.config.reference_paths.clip)
    return ref_gain.measure(model, samples, keys, FlowMatchingScheduler(shift=cfg.timestep_shift), seed=cfg.seed,
                            repeats=repeats)


def measure_likeness(config: Path, checkpoint: Path, steps: Optional[int] = None, clips: int = 8) -> dict:
    """How close the trained model's samples are to their subjects, against the untrained model's on
    the same seeds and inputs (ds_trainer/subject_likeness.py), over the run's clips: colour distance
    to each subject cut-out (the real clip's VAE reconstruction beside them, the reachable end), and
    latent distance to the sample's own clip vs the other clips. Over the first `clips` clips; without
    guidance, and for the trained model also with the config's `sample.ref_guidance`."""
    from data.opens2v import collate_opens2v_batch  # noqa: PLC0415
    from ds_trainer.config import load_train_config  # noqa: PLC0415
    from ds_trainer.datasets import opens2v_dataset  # noqa: PLC0415
    from ds_trainer.flow_step import inputs_from_batch  # noqa: PLC0415
    from ds_trainer.sample import build_generator, sample_video  # noqa: PLC0415
    from ds_trainer.sample_weights import base_generator  # noqa: PLC0415
    from ds_trainer.subject_likeness import colour_distance, latent_distances  # noqa: PLC0415
    from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415

    cfg = load_train_config(config)
    encoders = load_frozen_encoders(cfg.encoders)
    dataset = opens2v_dataset(cfg)
    models = {"trained": build_generator(cfg, checkpoint, str(config)),
              "untrained": base_generator(cfg, cfg.wan_config()).eval()}
    samples = [dataset[i] for i in range(min(clips, len(dataset)))]
    use_clip = cfg.wan_config().reference_paths.clip
    inputs = [inputs_from_batch(collate_opens2v_batch([s]), encoders, torch.device("cpu"), use_clip) for s in samples]
    clip_latents = torch.cat([i.latents for i in inputs])
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    with torch.no_grad():
        recon = [colour_distance(s["subject_images"][0], encoders.vae.decode(i.latents)[0].float())
                 for s, i in zip(samples, inputs)]
        out = {"clips": len(samples), "colour_distance_vae_reconstruction": mean(recon),
               "colour_distance_real_clip": mean([colour_distance(s["subject_images"][0], s["video"].float())
                                                  for s in samples])}
        runs = [(name, model, None) for name, model in models.items()]
        if cfg.sample.ref_guidance is not None:  # the untrained model's references add exactly 0: no row
            runs.append((f"trained_ref_guidance_{cfg.sample.ref_guidance:g}", models["trained"], cfg.sample.ref_guidance))
        for name, model, ref_guidance in runs:
            latents = [sample_video(model, i, steps or cfg.sample.steps, cfg.timestep_shift,
                                    torch.Generator().manual_seed(cfg.seed + k), ref_guidance=ref_guidance)
                       for k, i in enumerate(inputs)]
            colour = [colour_distance(s["subject_images"][0], encoders.vae.decode(x)[0].float())
                      for s, x in zip(samples, latents)]
            own, other = latent_distances(torch.cat(latents), clip_latents)
            out[name] = {"colour_distance": mean(colour), "latent_mse_own_clip": round(own, 4),
                         "latent_mse_other_clips": round(other, 4)}
    return out


def prepare_dmd(root: Path, clips: int = 4, seed: int = 0) -> Path:
    """The demo's data and encoders plus a tiny I2V base (generator start and teacher); returns the
    resolved configs/tiny_i2v_dmd.yaml."""
    from model.checkpoint import save_diffusers_dir  # noqa: PLC0415
    from model.config import WAN_TINY_I2V  # noqa: PLC0415
    from model.wan import WanModel  # noqa: PLC0415

    prepare(root, clips=clips, seed=seed)
    if not (root / "base_i2v").exists():
        torch.manual_seed(seed + 1)
        base = WanModel(WAN_TINY_I2V)
        torch.nn.init.normal_(base.head.head.weight, std=WAN_TINY_I2V.dim ** -0.5)  # a teacher that says something
        save_diffusers_dir(base, WAN_TINY_I2V, root / "base_i2v")
    config = root / "tiny_i2v_dmd.yaml"
    config.write_text((configs_dir() / "tiny_i2v_dmd.yaml").read_text().replace("@DEMO@", str(root.resolve())))
    return config


def launch_training(config: Path, logdir: Path, ranks: int, zero: str, extra: list[str] = ()) -> None:
    """`deepspeed --num_gpus N --module ds_trainer.train` on CPU (gloo), as a user would run it."""
    from ds_trainer.distributed import free_port  # noqa: PLC0415  (imports deepspeed)
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANSPEED_NO_PROGRESS=os.environ.get("WANSPEED_NO_PROGRESS", "0"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "--module", "ds_trainer.train", "--config", str(config), "--logdir", str(logdir),
           "--zero", zero, *extra]
    log.info("launching: %s", " ".join(cmd))
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
