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
    src = Path(path) if path else configs_dir() / "ds" / ZERO_FILES[zero]
    try:
        return json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read the DeepSpeed config: {exc}") from exc


def resolve_ds_config(raw: dict[str, Any], micro_batch: int, grad_accum: int, max_grad_norm: float,
                      on_gpu: bool, world_size: int) -> dict[str, Any]:
    """Fill "auto" values; explicit values in the file win (a mismatch with the run is an error)."""
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
    bf16 = cfg.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = on_gpu
    if not on_gpu and bf16["enabled"]:
        raise ConfigError("bf16 is enabled in the DeepSpeed config but there is no GPU: use fp32 on CPU")
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def eval_ds_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of a frozen engine (DMD's real-score teacher): same ZeRO stage and precision,
    no optimizer, no offload of optimizer states."""
    out = copy.deepcopy(cfg)
    out["zero_optimization"].pop("offload_optimizer", None)
    out.pop("gradient_clipping", None)
    return out
