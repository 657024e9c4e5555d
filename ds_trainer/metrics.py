"""Run logging: rank-0 log records, a tqdm bar, wandb (online with a key, else offline, or off),
and `metrics.jsonl` in the log dir (what `wanspeed plot` reads)."""
from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


class RankZeroFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        handler.addFilter(RankZeroFilter(rank))
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLogger:
    """Rank 0 only: appends metrics to `metrics.jsonl`, mirrors them to wandb, drives the bar."""

    def __init__(self, logdir: Path, rank: int, total_steps: int, start_step: int, wandb_cfg, disable_wandb: bool,
                 run_config: dict[str, Any], headline: str = "loss"):
        """headline: the metric the progress bar shows."""
        self.rank, self.path, self.headline = rank, Path(logdir) / "metrics.jsonl", headline
        self.wandb, self.bar = None, None
        if rank != 0:
            return
        if start_step == 0:
            self._set_aside_previous_run()
        from tqdm import tqdm  # noqa: PLC0415
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=os.environ.get("WANSPEED_NO_PROGRESS") == "1")
        if not disable_wandb:
            self.wandb = self._start_wandb(wandb_cfg, Path(logdir), run_config)

    def _set_aside_previous_run(self) -> None:
        """A run starting at step 0 (fresh, or `--no-auto-resume` in a used log dir) writes a new
        metrics.jsonl; an earlier run's rows move to metrics.previous-<n>.jsonl, not mixed in."""
        if not self.path.exists():
            return
        n = 1
        while (old := self.path.with_name(f"metrics.previous-{n}.jsonl")).exists():
            n += 1
        self.path.rename(old)
        log.info("metrics.jsonl of an earlier run in this log dir kept as %s", old.name)

    @staticmethod
    def _start_wandb(cfg, logdir: Path, run_config: dict[str, Any]):
        import wandb  # noqa: PLC0415
        mode = cfg.mode if cfg.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name, dir=str(logdir), mode=mode,
                         config=run_config, resume="allow")
        log.info("wandb %s run in %s", mode, run.dir)
        return run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.update(1)
            postfix = {self.headline: f"{metrics[self.headline]:.4f}"} if self.headline in metrics else {}
            postfix["sps"] = f"{metrics['samples_per_s']:.2f}"
            if "data_wait_s" in metrics:  # share of the step spent waiting for the DataLoader
                postfix["data"] = f"{metrics['data_wait_s'] / max(metrics['step_time_s'], 1e-9):.0%}"
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(logdir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a resumed run rewrites the steps after its checkpoint: keep the last."""
    rows: dict[int, dict[str, Any]] = {}
    path = Path(logdir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def summarise(rows: list[dict[str, Any]], window: int = 10) -> Optional[dict[str, float]]:
    if len(rows) < 2 * window:
        return None
    first = sum(r["loss"] for r in rows[:window]) / window
    last = sum(r["loss"] for r in rows[-window:]) / window
    return {"first_loss_mean": first, "last_loss_mean": last, "relative_drop": 1 - last / first}
