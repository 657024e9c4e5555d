"""`Trainer`: the base every training job subclasses (the subject adapters today, DMD next).

It owns what every job shares:
- the fixed build order: process group -> DeepSpeed config -> models -> engines -> data ->
  resume -> logging (`__init__`; a job overrides `build_models`, `build_engines`, `build_data`);
- the loop (`train`): every rank runs the same control flow, so batch counts are equal (bad
  samples are replaced, not dropped), a non-finite loss skips the micro-batch on ALL ranks (the
  flag is all-reduced) and checkpoints are collective;
- checkpoints: naming from the job's `checkpoint_prefix`, its `compatibility_key`, the DeepSpeed
  state of each trainable role, atomic publish and resume (ds_trainer/checkpointing.py).

A job sets `name` and `checkpoint_prefix`, builds its roles (`self.engines`: role -> trainable
engine; frozen roles are kept elsewhere), and defines `compute_loss` (one engine) or overrides
`train_step` (several engines, e.g. DMD's generator and critic), plus `write_exports` for the
files its users load from a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Optional

import torch
import yaml

from data.sampler import ResumableDistributedSampler
from ds_trainer import checkpointing as ckpt
from ds_trainer.config import RunConfig
from ds_trainer.distributed import all_reduce_scalar, any_rank, broadcast_object, default_device, init_distributed
from ds_trainer.ds_config import read_ds_config, resolve_ds_config, zero_stage
from ds_trainer.metrics import MetricsLogger, peak_memory_mb, setup_logging
from launch.shared_fs import require_shared_directories
from model.sequence_parallel import init_sequence_parallel

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


class Trainer:
    name: ClassVar[str] = ""
    """The job's name: the config's `job:` value, recorded in every checkpoint's compatibility key."""
    checkpoint_prefix: ClassVar[str] = ""
    """Checkpoint directories are `<logdir>/<checkpoint_prefix>{step:06d}`."""
    weights_file: ClassVar[Optional[str]] = None
    """The torch file of trained weights the job exports in each checkpoint (checked on resume)."""
    headline_metric: ClassVar[str] = "loss"
    """The metric of `train_step` the progress bar shows."""
    supports_sequence_parallel: ClassVar[bool] = False
    """The job shards its models' sequences (model.sequence_parallel.apply_sequence_parallel) when
    `sequence_parallel_size` > 1; a job that does not refuses such a config."""

    def __init__(self, cfg: RunConfig, logdir: str | Path, auto_resume: bool = True):
        self.cfg, self.logdir = cfg, Path(logdir)
        if cfg.sequence_parallel_size > 1 and not self.supports_sequence_parallel:
            raise ValueError(f"sequence_parallel_size {cfg.sequence_parallel_size}: the {self.name!r} job "
                             f"does not run sequence-parallel; use 1")
        self.rank, self.world = init_distributed()
        setup_logging(self.rank)
        # sequence parallelism: SP groups of K consecutive ranks share each sample, so data order,
        # noise draws and batch sizes follow the data-parallel coordinates (rank // K, world / K)
        self.sp = init_sequence_parallel(cfg.sequence_parallel_size)
        k = cfg.sequence_parallel_size
        self.dp_rank, self.dp_world = self.rank // k, self.world // k
        if self.sp is not None:
            log.info("sequence parallel: %d data-parallel groups of %d ranks (this rank: SP rank %d, data rank %d)",
                     self.dp_world, k, self.sp.rank, self.dp_rank)
        self.device = default_device()
        if self.rank == 0:
            self.logdir.mkdir(parents=True, exist_ok=True)
        # rank 0 renames every finished checkpoint and all ranks read the cache: a node-local
        # path is an error now, not a broken checkpoint later (no-op in a world of one)
        require_shared_directories({"logdir": self.logdir, "cache_dir": getattr(cfg, "cache_dir", None)})
        self.ds_config = resolve_ds_config(read_ds_config(cfg.zero, cfg.deepspeed_config), cfg.batch_size,
                                           cfg.gradient_accumulation_steps, cfg.max_grad_norm,
                                           self.device.type == "cuda", self.dp_world, cfg.sequence_parallel_size)
        self.stage = zero_stage(self.ds_config)
        torch.manual_seed(cfg.seed)  # identical new layers (adapters, LoRA) on every rank
        self.build_models()
        self.engines: dict[str, Any] = self.build_engines()
        self.dataset = self.build_data()
        self.sampler = ResumableDistributedSampler(len(self.dataset), self.dp_rank, self.dp_world, seed=cfg.seed,
                                                   batch_size=cfg.batch_size)
        self.step, self.totals = 0, {"skipped_samples": 0, "nonfinite_losses": 0}
        if auto_resume:
            self.resume()
        self.write_run_files()
        self.metrics = MetricsLogger(self.logdir, self.rank, cfg.max_iters, self.step, cfg.wandb, cfg.disable_wandb,
                                     cfg.to_dict(), headline=self.headline_metric)

    # ----------------------------------------------------------------- what a job defines
    def build_models(self) -> None:
        """Build (and load) the job's modules as attributes of `self`."""
        raise NotImplementedError

    def build_engines(self) -> dict[str, Any]:
        """role -> DeepSpeed engine with an optimizer, for every trainable role (the first role's
        checkpoint carries the client state). Frozen roles are engines the job keeps itself."""
        raise NotImplementedError

    def build_data(self) -> torch.utils.data.Dataset:
        """The training dataset (any per-rank helpers, e.g. frozen encoders, too)."""
        raise NotImplementedError

    def make_loader(self) -> Iterable:
        """A DataLoader over `self.dataset` in `self.sampler`'s order, for one epoch."""
        raise NotImplementedError

    def compute_loss(self, batch, micro: int) -> torch.Tensor:
        """The loss of one micro-batch on this rank (single-engine jobs)."""
        raise NotImplementedError

    def roles_stepped(self) -> list[str]:
        """The roles whose optimizer stepped in the last step (their lr and grad norm are logged)."""
        return list(self.engines)

    def describe_batch(self, batch) -> str:
        """Which samples a batch holds, for messages (e.g. the clip keys)."""
        return "this batch"

    def write_exports(self, tmp: Path) -> None:
        """Write the job's own checkpoint files into `tmp` (every rank calls it; rank 0 writes)."""

    @classmethod
    def check_exports(cls, checkpoint: Path) -> Optional[str]:
        """None if the job's own files in a checkpoint are readable, else why not."""
        if cls.weights_file is None:
            return None
        try:
            torch.load(checkpoint / cls.weights_file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a corrupt zip / pickle
            return f"{cls.weights_file} unreadable ({exc})"
        return None

    @classmethod
    def compatibility_fields(cls, cfg: RunConfig) -> dict[str, Any]:
        """What a checkpoint must share with a run of this job for the run to resume from it."""
        return {}

    def restore(self, checkpoint: Path) -> None:
        """Restore the job's own state from a checkpoint on resume (every rank), after DeepSpeed's."""

    def finish(self) -> None:
        """Called once after the last step (every rank)."""

    def before_training(self) -> None:
        """Called once before the first step of `train` (every rank; collectives are fine)."""

    def after_step(self) -> None:
        """Called after each optimizer step and its checkpoint, at `self.step` (every rank, at the
        same steps: periodic collective work such as validation goes here)."""

    # ------------------------------------------------------------------------ checkpoints
    @classmethod
    def compatibility_key(cls, cfg: RunConfig) -> dict[str, Any]:
        return {"job": cls.name, **cls.compatibility_fields(cfg)}

    @classmethod
    def fingerprint(cls, cfg: RunConfig) -> str:
        key = json.dumps(cls.compatibility_key(cfg), sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @classmethod
    def list_checkpoints(cls, logdir: Path) -> list[Path]:
        return ckpt.list_checkpoints(logdir, cls.checkpoint_prefix)

    @classmethod
    def find_resumable(cls, logdir: Path, cfg: RunConfig, layout: Optional[dict[str, Any]] = None) -> Optional[Path]:
        """The newest intact checkpoint of this job and config in `logdir` (see checkpointing);
        with `layout`, its ZeRO stage must match too (another world size is converted on load)."""
        return ckpt.find_resumable(logdir, cls.checkpoint_prefix, cls.compatibility_key(cfg), layout,
                                   cls.check_exports)

    @property
    def layout(self) -> dict[str, Any]:
        """How the DeepSpeed state is partitioned: a resume keeps the stage; another world size
        loads through a universal checkpoint."""
        return {"world_size": self.world, "zero_stage": self.stage}

    def resume(self) -> None:
        found, error = None, None
        if self.rank == 0:
            try:
                found = self.find_resumable(self.logdir, self.cfg, self.layout)
            except (ckpt.IncompatibleCheckpoint, ckpt.NoUsableCheckpoint) as exc:
                error = (type(exc).__name__, str(exc))
        found, error = broadcast_object((str(found) if found else None, error))
        if error:
            raise getattr(ckpt, error[0])(error[1])  # on every rank: none is left waiting
        if found is None:
            return
        client = ckpt.load_checkpoint(self.engines, Path(found), self.world)
        self.restore(Path(found))
        self.step = int(client["step"])
        self.sampler.load_state_dict(client["sampler"])
        self.totals.update(client.get("totals", {}))
        log.info("resumed from %s at step %d", found, self.step)

    def save(self) -> Path:
        meta = {"compat": self.compatibility_key(self.cfg), "fingerprint": self.fingerprint(self.cfg),
                **self.layout}
        client = {"step": self.step, "sampler": self.sampler.state_dict(), "totals": dict(self.totals)}
        return ckpt.save_checkpoint(self.logdir, self.checkpoint_prefix, self.step, self.engines, meta, client,
                                    self.cfg.keep_last_checkpoints, self.write_exports)

    def write_run_files(self) -> None:
        if self.rank != 0:
            return
        from ds_trainer.info import versions  # noqa: PLC0415
        (self.logdir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(self.cfg.to_dict(), default=str)),
                                                                sort_keys=False))
        (self.logdir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        (self.logdir / "versions.json").write_text(json.dumps(versions(), indent=2))

    # ------------------------------------------------------------------------------- loop
    @property
    def engine(self):
        """The one trainable engine of a single-role job."""
        if len(self.engines) != 1:
            raise AttributeError(f"{type(self).__name__} has roles {sorted(self.engines)}: use self.engines[role]")
        return next(iter(self.engines.values()))

    def train_step(self, batch, micro: int) -> Optional[dict[str, float]]:
        """Forward + backward of one micro-batch; its metrics, or None when the loss was
        non-finite on any rank (then no rank runs backward: the batch is skipped everywhere)."""
        loss = self.compute_loss(batch, micro)
        finite = bool(torch.isfinite(loss).item())
        if not finite:
            log.warning("rank %d: non-finite loss (%s) at step %d, micro-batch %d, on %s", self.rank, loss.item(),
                        self.step, micro, self.describe_batch(batch))
        if any_rank(not finite):
            return None
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.item()}

    def train(self) -> dict:
        cfg, rows, micro, consecutive_bad, t0 = self.cfg, [], 0, 0, time.perf_counter()
        data_wait = 0.0
        self.before_training()
        while self.step < cfg.max_iters:
            batches = 0
            for batch, waited in _timed(self.make_loader()):
                batches += 1
                data_wait += waited
                self.sampler.advance(cfg.batch_size)
                self.totals["skipped_samples"] += int(all_reduce_scalar(len(getattr(batch, "skipped", []) or [])))
                row = self.train_step(batch, micro)
                if row is None:
                    consecutive_bad += 1
                    self.totals["nonfinite_losses"] += 1
                    log.warning("non-finite loss at step %d (micro-batch %d): skipped on all ranks (%d in a row)",
                                self.step, micro, consecutive_bad)
                    if consecutive_bad >= cfg.max_consecutive_nonfinite:
                        raise NonFiniteLossError(f"{consecutive_bad} non-finite losses in a row at step {self.step}; stopping")
                    continue
                consecutive_bad = 0
                rows.append(row)
                micro += 1
                if micro < cfg.gradient_accumulation_steps:
                    continue
                self.step += 1
                self.log_step(rows, time.perf_counter() - t0, data_wait)
                rows, micro, t0, data_wait = [], 0, time.perf_counter(), 0.0
                if self.step % cfg.log_iters == 0 or self.step == cfg.max_iters:
                    path = self.save()
                    log.info("checkpoint %s", path.name)
                self.after_step()
                if self.step >= cfg.max_iters:
                    break
                if self.sampler.consumed == 0:
                    break  # epoch rolled over: rebuild the loader (new order, new random choices)
            if batches == 0:  # the sampler guarantees full batches; never spin on an empty loader
                raise RuntimeError(f"the data loader yielded no batch at epoch {self.sampler.epoch} "
                                   f"(position {self.sampler.consumed} of {self.sampler.per_epoch})")
        self.metrics.close()
        self.finish()
        return dict(step=self.step, **self.totals)

    def log_step(self, rows: list[dict[str, float]], seconds: float, data_wait: float) -> None:
        """Each metric of `train_step` averaged over the step's micro-batches and the ranks.
        data_wait_s: this rank's time blocked on the DataLoader during the step (the loader is
        the bottleneck when it is a large share of step_time_s: raise num_workers or use the cache)."""
        means = {k: all_reduce_scalar(sum(r[k] for r in rows) / len(rows)) / self.world for k in rows[0]}
        samples = self.cfg.batch_size * self.cfg.gradient_accumulation_steps * self.dp_world
        for role in self.roles_stepped():
            engine = self.engines[role]
            suffix = "" if len(self.engines) == 1 else f"_{role}"
            grad_norm = engine.get_global_grad_norm()
            means[f"lr{suffix}"] = engine.get_lr()[0]
            means[f"grad_norm{suffix}"] = float(grad_norm) if grad_norm is not None else float("nan")
        self.metrics.log(self.step, {
            **means, "step_time_s": seconds, "samples_per_s": samples / max(seconds, 1e-9), "data_wait_s": data_wait,
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
