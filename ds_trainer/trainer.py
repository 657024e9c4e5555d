"""`AdapterTrainer`: frozen-backbone subject-adapter training on DeepSpeed (the OpenS2V seed).

Built in a fixed order: process group -> DeepSpeed config -> generator (partitioned as built,
base weights loaded) -> LoRA -> freeze -> engine -> data -> encoders (unless training from the
cache) -> resume -> logging. `train()` is the loop. Every rank runs the same control flow:
equal batch counts (bad samples are replaced, not dropped), a non-finite loss skips the
micro-batch on ALL ranks (the flag is all-reduced), checkpoints are collective.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import yaml

from data.cache import CachedOpenS2VDataset, collate_cached_batch
from data.opens2v import create_opens2v_dataloader
from data.sampler import ResumableDistributedSampler
from ds_trainer import checkpointing as ckpt
from ds_trainer.apply import apply_activation_checkpointing, apply_freeze, apply_lora, trainable_patterns
from ds_trainer.config import TrainConfig
from ds_trainer.datasets import opens2v_dataset
from ds_trainer.ds_config import read_ds_config, resolve_ds_config, zero_stage
from ds_trainer.engine import build_engine, build_wan, count_parameters, default_device, init_distributed
from ds_trainer.flow_step import flow_matching_loss, inputs_from_cache, inputs_from_raw, step_generator
from ds_trainer.metrics import MetricsLogger, peak_memory_mb, setup_logging
from model.flow_matching import FlowMatchingScheduler

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def _all_reduce(value: float, op=dist.ReduceOp.SUM) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return float(t.item())


def _broadcast(obj):
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


class AdapterTrainer:
    def __init__(self, cfg: TrainConfig, logdir: str | Path, auto_resume: bool = True):
        self.cfg, self.logdir = cfg, Path(logdir)
        self.rank, self.world = init_distributed()
        setup_logging(self.rank)
        self.device = default_device()
        if self.rank == 0:
            self.logdir.mkdir(parents=True, exist_ok=True)
        self.ds_config = resolve_ds_config(read_ds_config(cfg.zero, cfg.deepspeed_config), cfg.batch_size,
                                           cfg.gradient_accumulation_steps, cfg.max_grad_norm,
                                           self.device.type == "cuda", self.world)
        self.stage = zero_stage(self.ds_config)
        self.model = self._build_model()
        self.engine = build_engine(self.model, self.ds_config, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   warmup_steps=cfg.warmup_steps)
        self.dataset, self.collate = self._build_data()
        self.sampler = ResumableDistributedSampler(len(self.dataset), self.rank, self.world, seed=cfg.seed)
        self.encoders = self._load_encoders() if cfg.cache_dir is None else None
        self.scheduler = FlowMatchingScheduler(shift=cfg.timestep_shift)
        self.step, self.totals = 0, {"skipped_samples": 0, "nonfinite_losses": 0}
        if auto_resume:
            self._resume()
        self._write_run_files()
        self.metrics = MetricsLogger(self.logdir, self.rank, cfg.max_iters, self.step, cfg.wandb, cfg.disable_wandb,
                                     cfg.to_dict())

    # ------------------------------------------------------------------------------- building
    def _build_model(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical new layers (adapters, LoRA) on every rank
        model = build_wan(cfg.wan_config(), self.ds_config, cfg.generator_ckpt, self.device)
        if cfg.adapter:
            a = cfg.adapter
            model = apply_lora(model, a.r, a.lora_alpha, a.lora_dropout, a.target_modules)
        apply_activation_checkpointing(model, cfg.model.activation_checkpointing)
        clip_is_new = model.config.model_type == "t2v" and cfg.train_clip_path
        self.trainable_names = apply_freeze(model, trainable_patterns(cfg.train_fused_path, clip_is_new))
        total, train = count_parameters(model)
        log.info("generator: %.2fM parameters, %.3fM trainable (%d tensors), ZeRO stage %d, world %d",
                 total / 1e6, train / 1e6, len(self.trainable_names), zero_stage(self.ds_config), self.world)
        return model

    def _build_data(self):
        if self.cfg.cache_dir:
            return CachedOpenS2VDataset(self.cfg.cache_dir), collate_cached_batch
        return opens2v_dataset(self.cfg), None

    def _load_encoders(self):
        from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415
        enc = load_frozen_encoders(self.cfg.encoders, self.device)
        if self.cfg.train_clip_path and enc.clip is None:
            raise ValueError("train_clip_path is on but encoders.clip is not set")
        return enc

    def _loader(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.sampler.epoch)
        if self.collate is None:
            return create_opens2v_dataloader(self.dataset, self.cfg.batch_size, self.sampler, self.cfg.num_workers)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                                           num_workers=self.cfg.num_workers, collate_fn=self.collate, drop_last=True)

    # ------------------------------------------------------------------------------- resuming
    def _resume(self) -> None:
        found, error = None, None
        if self.rank == 0:
            try:
                found = ckpt.find_resumable(self.logdir, self.cfg.compatibility_key())
            except ckpt.IncompatibleCheckpoint as exc:
                error = str(exc)
        found, error = _broadcast((str(found) if found else None, error))
        if error:
            raise ckpt.IncompatibleCheckpoint(error)
        if found is None:
            return
        client = ckpt.load_checkpoint(self.engine, Path(found))
        self.step = int(client["step"])
        self.sampler.load_state_dict(client["sampler"])
        self.totals.update(client.get("totals", {}))
        log.info("resumed from %s at step %d", found, self.step)

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        from ds_trainer.info import versions  # noqa: PLC0415
        (self.logdir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(self.cfg.to_dict(), default=str)),
                                                                sort_keys=False))
        (self.logdir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        (self.logdir / "versions.json").write_text(json.dumps(versions(), indent=2))

    def save(self) -> Path:
        meta = {"compat": self.cfg.compatibility_key(), "fingerprint": self.cfg.fingerprint(), "world_size": self.world}
        client = {"step": self.step, "sampler": self.sampler.state_dict(), "totals": dict(self.totals)}
        return ckpt.save_checkpoint(self.engine, self.model, self.step, self.logdir, meta, client, self.stage,
                                    self.cfg.keep_last_checkpoints, lora=self.cfg.adapter is not None)

    # ---------------------------------------------------------------------------------- loop
    def _inputs(self, batch):
        use_clip = self.model.config.reference_paths.clip
        if self.encoders is None:
            return inputs_from_cache(batch, self.device, use_clip)
        return inputs_from_raw(batch, self.encoders, self.device, use_clip)

    def _micro_step(self, batch, micro: int) -> Optional[float]:
        """Forward + backward of one micro-batch; None when the loss was non-finite on any rank
        (then no rank runs backward: the batch is skipped everywhere)."""
        inputs = self._inputs(batch)
        gen = step_generator(self.cfg.seed, self.step, micro, self.rank)
        loss = flow_matching_loss(self.engine, inputs, self.scheduler, gen)
        if _nan_injected(self.step, self.rank):
            loss = loss * float("nan")
        bad = _all_reduce(0.0 if torch.isfinite(loss).item() else 1.0, dist.ReduceOp.MAX)
        if bad:
            return None
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    def train(self) -> dict:
        cfg, losses, micro, consecutive_bad, t0 = self.cfg, [], 0, 0, time.perf_counter()
        data_wait = 0.0
        while self.step < cfg.max_iters:
            for batch, waited in _timed(self._loader()):
                data_wait += waited
                self.sampler.advance(cfg.batch_size)
                self.totals["skipped_samples"] += int(_all_reduce(len(getattr(batch, "skipped", []) or [])))
                loss = self._micro_step(batch, micro)
                if loss is None:
                    consecutive_bad += 1
                    self.totals["nonfinite_losses"] += 1
                    log.warning("non-finite loss at step %d (micro-batch %d): skipped on all ranks (%d in a row)",
                                self.step, micro, consecutive_bad)
                    if consecutive_bad >= cfg.max_consecutive_nonfinite:
                        raise NonFiniteLossError(f"{consecutive_bad} non-finite losses in a row at step {self.step}; stopping")
                    continue
                consecutive_bad = 0
                losses.append(loss)
                micro += 1
                if micro < cfg.gradient_accumulation_steps:
                    continue
                self.step += 1
                self._log_step(losses, time.perf_counter() - t0, data_wait)
                losses, micro, t0, data_wait = [], 0, time.perf_counter(), 0.0
                if self.step % cfg.log_iters == 0 or self.step == cfg.max_iters:
                    path = self.save()
                    log.info("checkpoint %s", path.name)
                if self.step >= cfg.max_iters:
                    break
                if self.sampler.consumed == 0:
                    break  # epoch rolled over: rebuild the loader (new order, new random choices)
        self.metrics.close()
        if cfg.export_full:
            ckpt.export_full(self.model, self.stage, self.logdir / "final_model.safetensors")
        return dict(step=self.step, **self.totals)

    def _log_step(self, losses: list[float], seconds: float, data_wait: float) -> None:
        """data_wait_s: this rank's time blocked on the DataLoader during the step (the loader is
        the bottleneck when it is a large share of step_time_s: raise num_workers or use the cache)."""
        mean_loss = _all_reduce(sum(losses) / len(losses)) / self.world
        samples = self.cfg.batch_size * self.cfg.gradient_accumulation_steps * self.world
        grad_norm = self.engine.get_global_grad_norm()
        self.metrics.log(self.step, {
            "loss": mean_loss, "lr": self.engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time_s": seconds, "samples_per_s": samples / max(seconds, 1e-9), "data_wait_s": data_wait,
            "peak_memory_mb": peak_memory_mb(self.device), **self.totals})


def _timed(batches: Iterable) -> Iterator[tuple[Any, float]]:
    """(batch, seconds spent waiting for it) for each batch of `batches`."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


_FIRED: set[str] = set()


def _nan_injected(step: int, rank: int) -> bool:
    """Test hook: WANSPEED_INJECT_NAN="rank:step,..." makes that loss NaN once; "rank:step+"
    every time step `step` is tried (to exercise the consecutive-failure stop)."""
    import os  # noqa: PLC0415
    for spec in (s.strip() for s in os.environ.get("WANSPEED_INJECT_NAN", "").split(",") if s.strip()):
        always = spec.endswith("+")
        if spec.rstrip("+") == f"{rank}:{step}" and (always or spec not in _FIRED):
            _FIRED.add(spec)
            return True
    return False
