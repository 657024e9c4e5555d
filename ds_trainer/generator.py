"""The Wan generator as a training role: built partitioned under ZeRO-3 (no rank ever holds the
whole model) and filled from the base checkpoint, or loaded whole for ZeRO-2 / one process."""
from __future__ import annotations

from typing import Optional

import deepspeed
import torch

from ds_trainer.distributed import broadcast_object, process_rank
from ds_trainer.ds_config import zero_stage
from ds_trainer.engine import param_shape
from model.causal import CausalConfig, CausalWanModel
from model.checkpoint import (CheckpointError, check_state_dict, load_state_dict_assign, load_wan_model, read_checkpoint,
                              strip_wrapper_prefix)
from model.config import WanConfig
from model.wan import WanModel, init_module_seeded


def build_wan(cfg: WanConfig, ds_config: dict, checkpoint: Optional[str], device: torch.device,
              dtype: torch.dtype = torch.float32, causal: Optional[CausalConfig] = None) -> WanModel:
    """A Wan role (a `CausalWanModel` with `causal`: same keys), partitioned as it is built under
    ZeRO-3, with the base weights loaded."""
    def build() -> WanModel:
        return CausalWanModel(cfg, causal) if causal is not None else WanModel(cfg)

    if zero_stage(ds_config) == 3:
        # dtype comes from the DeepSpeed config (bf16 on GPU, fp32 on CPU): passing dtype= here
        # gave bf16 partitions even for torch.float32 (deepspeed 0.19.8 on CPU).
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None):
            model = build()
        fill_partitioned(model, checkpoint)
        return model
    if checkpoint is not None and causal is not None:
        sd, _, _ = read_checkpoint(checkpoint)
        sd, _ = strip_wrapper_prefix(sd)
        with torch.device("meta"):
            model = build()
        load_state_dict_assign(model, sd, str(checkpoint), dtype=dtype, device=device)
        return model
    if checkpoint is None:
        model = build()
        seed = torch.initial_seed()
        for name, module in model.named_modules():  # same per-module init as the ZeRO-3 path
            if any(True for _ in module.parameters(recurse=False)):
                init_module_seeded(name, module, cfg, seed)
        return model.to(device=device, dtype=dtype)
    return load_wan_model(checkpoint, config=cfg, dtype=dtype, device=device)[0]


def fill_partitioned(model: WanModel, checkpoint: Optional[str]) -> None:
    """Load (or initialise) a ZeRO-3-partitioned model module by module.

    Only rank 0 reads the checkpoint (memory-mapped); each module's parameters are gathered,
    written on rank 0 and re-partitioned (broadcast), so no rank ever holds the whole model. A bad
    checkpoint is detected on rank 0 and raised on every rank (no rank is left waiting).
    """
    rank, sd, error, seed = process_rank(), None, None, torch.initial_seed()
    if rank == 0 and checkpoint is not None:
        try:
            sd, _, _ = read_checkpoint(checkpoint)
            sd, _ = strip_wrapper_prefix(sd)
            expected = {n: param_shape(p) for n, p in model.named_parameters()}
            check_state_dict(sd, expected, model.config, str(checkpoint))
        except CheckpointError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise CheckpointError(error)
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            if rank != 0:
                continue
            keys = [f"{name}.{n}" if name else n for n, _ in params]
            if sd is not None and all(k in sd for k in keys):
                for (_, p), k in zip(params, keys):
                    p.data.copy_(sd[k])  # converts to the partition's dtype
            else:  # an adapter layer absent from the base checkpoint, or no checkpoint at all
                init_module_seeded(name, module, model.config, seed)
