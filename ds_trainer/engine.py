"""One engine builder for every role (the DeepSpeed-Chat shape, without its copy-pasted inits):
the subject-adapter generator today; DMD's generator, critic and frozen real-score teacher later.

`build_engine` wraps any module in a DeepSpeed engine, with an optimizer over the trainable
parameters only, or none for a frozen role. `gathered` and `count_parameters` read ZeRO-3
partitioned parameters.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import deepspeed
import torch
import torch.nn as nn

from ds_trainer.ds_config import DEEPSPEED_REDUCE_BUCKET_SIZE, zero_stage
from ds_trainer.safe_checkpoint_engine import use_weights_only_loading
from model.sequence_parallel import sequence_parallel_mpu


def param_shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape in ds_shape


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_engine(module: nn.Module, ds_config: dict, lr: Optional[float] = None, weight_decay: float = 0.0,
                 warmup_steps: int = 0, betas: tuple[float, float] = (0.9, 0.999)):
    """A DeepSpeed engine for one role. With `lr`, an AdamW over the trainable parameters only
    (and a linear warm-up), whose checkpoints load with weights_only; without, a frozen engine
    (no optimizer, never checkpointed)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    # sequence parallelism: DeepSpeed's SP groups as the mpu (ZeRO over every rank, gradients
    # summed over the SP group and averaged over data parallel; model/sequence_parallel.py)
    mpu = sequence_parallel_mpu() if ds_config.get("sequence_parallel_size", 1) > 1 else None
    if mpu is not None and zero_stage(ds_config) == 3:
        _check_zero3_sp_buckets(module, ds_config)
    if lr is None:
        engine, *_ = deepspeed.initialize(model=module, config=ds_config, mpu=mpu)
        return engine
    if not trainable:
        raise ValueError("build_engine: an optimizer was asked for but no parameter is trainable")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=trainable, config=ds_config, mpu=mpu)
    use_weights_only_loading(engine)  # resuming must not run pickled code
    return engine


def _check_zero3_sp_buckets(module: nn.Module, ds_config: dict) -> None:
    """A trainable tensor larger than reduce_bucket_size sends ZeRO-3 down its reduce-scatter path,
    which averages sequence-parallel gradients instead of summing them (ds_config.py)."""
    limit = float(ds_config["zero_optimization"].get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET_SIZE))
    for name, p in module.named_parameters():
        if p.requires_grad and math.prod(param_shape(p)) > limit:
            raise ValueError(f"trainable {name} has {math.prod(param_shape(p))} elements, more than "
                             f"zero_optimization.reduce_bucket_size={limit:g}: raise reduce_bucket_size to at least "
                             f"that for sequence parallelism under ZeRO-3")


def gathered(params: list[torch.Tensor], stage: int):
    """Context in which ZeRO-3 parameters hold their full tensors on every rank (read only)."""
    return deepspeed.zero.GatheredParameters(params) if stage == 3 else nullcontext()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(math.prod(param_shape(p)) for p in model.parameters())
    train = sum(math.prod(param_shape(p)) for p in model.parameters() if p.requires_grad)
    return total, train
