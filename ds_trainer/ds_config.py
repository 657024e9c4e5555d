"""The one place that writes DeepSpeed JSON: a file from configs/ds/ with its "auto" values filled
from the run config (micro-batch, accumulation, clipping, precision: bf16 on GPU, fp32 on CPU)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from ds_trainer.shipped import configs_dir
from model.config import ConfigError

ZERO_FILES = {"2": "zero2.json", "3": "zero3.json", "3-offload": "zero3_offload.json"}


def read_ds_config(zero: str = "3", path: Optional[str] = None) -> dict[str, Any]:
    if zero not in ZERO_FILES and path is None:
        raise ConfigError(f"zero: {zero!r} names no file of configs/ds ({sorted(ZERO_FILES)}); 'auto' is resolved "
                          f"first by ds_trainer.memory_plan.resolve_auto_zero")
    src = Path(path) if path else configs_dir() / "ds" / ZERO_FILES[zero]
    try:
        return json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read the DeepSpeed config: {exc}") from exc


def resolve_ds_config(raw: dict[str, Any], micro_batch: int, grad_accum: int, max_grad_norm: float,
                      on_gpu: bool, world_size: int, sequence_parallel_size: int = 1) -> dict[str, Any]:
    """Fill "auto" values; explicit values in the file win (a mismatch with the run is an error).

    world_size counts data-parallel ranks (world / sequence_parallel_size). With sequence
    parallelism the config carries `sequence_parallel_size`, which DeepSpeed (zero.Init, and the
    engine with its `mpu`) reads to size its data-parallel world."""
    cfg = copy.deepcopy(raw)
    cfg.pop("_comment", None)
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": max_grad_norm}
    for key, value in wanted.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif key != "gradient_clipping" and cfg[key] != value:
            raise ConfigError(f"DeepSpeed config sets {key}={cfg[key]} but the run config asks for {value}")
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    if sequence_parallel_size > 1:
        cfg["sequence_parallel_size"] = sequence_parallel_size
        if zero_stage(cfg) == 3:
            _zero3_reduction_summing_over_sp(cfg["zero_optimization"])
    bf16 = cfg.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = on_gpu
    if not on_gpu and bf16["enabled"]:
        raise ConfigError("bf16 is enabled in the DeepSpeed config but there is no GPU: use fp32 on CPU")
    return cfg


ZERO3_SP_REDUCTION = {"reduce_scatter": False, "contiguous_gradients": True}
DEEPSPEED_REDUCE_BUCKET_SIZE = 5e8  # DeepSpeed's default reduce_bucket_size


def _zero3_reduction_summing_over_sp(zero: dict[str, Any]) -> None:
    """Under sequence parallelism each rank's gradient is its tokens' share, so the SP group's
    gradients must be SUMMED (and averaged over data parallel). DeepSpeed 0.19.8's ZeRO-3 does that
    only on its all-reduce path (contiguous_gradients, reduce_scatter false, every trainable tensor
    within reduce_bucket_size: ds_trainer/engine.py checks that); its default reduce-scatter path
    averages over every rank and ignores sequence_parallel_size (an SP = 2 gradient came out halved,
    measured). ZeRO-2 sums on either path."""
    for key, value in ZERO3_SP_REDUCTION.items():
        if zero.get(key, value) != value:
            raise ConfigError(f"zero_optimization.{key}={zero[key]} cannot be used with sequence parallelism "
                              f"under ZeRO-3 (DeepSpeed would average the SP group's gradients instead of "
                              f"summing them); set it to {str(value).lower()} or remove it")
        zero[key] = value


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def eval_ds_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of a frozen engine (DMD's real-score teacher): same ZeRO stage and precision,
    no optimizer, no offload of optimizer states."""
    out = copy.deepcopy(cfg)
    out["zero_optimization"].pop("offload_optimizer", None)
    out.pop("gradient_clipping", None)
    return out
