"""One engine builder for every role (the DeepSpeed-Chat shape, without its copy-pasted inits):
the subject-adapter generator today; DMD's generator, critic and frozen real-score teacher later.

`build_wan` builds the Wan generator (partitioned as it is built under ZeRO-3) and fills it from
the base checkpoint; `build_engine` wraps any module in a DeepSpeed engine, with an optimizer over
the trainable parameters only, or none for a frozen role.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn

from ds_trainer.ds_config import zero_stage
from model.checkpoint import CheckpointError, check_state_dict, load_wan_model, read_checkpoint, strip_wrapper_prefix
from model.config import WanConfig
from model.wan import WanModel, init_module_seeded

log = logging.getLogger(__name__)


def process_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _param_shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape in ds_shape


def build_wan(cfg: WanConfig, ds_config: dict, checkpoint: Optional[str], device: torch.device,
              dtype: torch.dtype = torch.float32) -> WanModel:
    """The generator, partitioned as it is built under ZeRO-3, with the base weights loaded."""
    if zero_stage(ds_config) == 3:
        # dtype comes from the DeepSpeed config (bf16 on GPU, fp32 on CPU): passing dtype= here
        # gave bf16 partitions even for torch.float32 (deepspeed 0.19.8 on CPU).
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None):
            model = WanModel(cfg)
        fill_partitioned(model, checkpoint)
        return model
    if checkpoint is None:
        model = WanModel(cfg)
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
            expected = {n: _param_shape(p) for n, p in model.named_parameters()}
            check_state_dict(sd, expected, model.config, str(checkpoint))
        except CheckpointError as exc:
            error = str(exc)
    box = [error]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])
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


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_engine(module: nn.Module, ds_config: dict, lr: Optional[float] = None, weight_decay: float = 0.0,
                 warmup_steps: int = 0):
    """A DeepSpeed engine for one role. With `lr`, an AdamW over the trainable parameters only
    (and a linear warm-up); without, a frozen engine (no optimizer)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if lr is None:
        engine, *_ = deepspeed.initialize(model=module, config=ds_config)
        return engine
    if not trainable:
        raise ValueError("build_engine: an optimizer was asked for but no parameter is trainable")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=trainable, config=ds_config)
    return engine


def gathered(params: list[torch.Tensor], stage: int):
    """Context in which ZeRO-3 parameters hold their full tensors on every rank (read only)."""
    return deepspeed.zero.GatheredParameters(params) if stage == 3 else nullcontext()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(math.prod(_param_shape(p)) for p in model.parameters())
    train = sum(math.prod(_param_shape(p)) for p in model.parameters() if p.requires_grad)
    return total, train


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """Join the process group started by the `deepspeed` launcher (gloo on CPU, nccl on GPU);
    a plain `python` process becomes a world of one."""
    import os  # noqa: PLC0415
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend)
    release_shm_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size()


def shm_allreduce_buffer(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) creates for a
    rank: `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, 66 MB."""
    import os  # noqa: PLC0415
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_allreduce_buffer() -> None:
    """Unlink this rank's DeepSpeed shm all-reduce segment once every rank has mapped it.

    DeepSpeed never unlinks these segments, so every CPU run used to leave 66 MB per rank in
    /dev/shm (host RAM) until the machine rebooted: a test suite's worth of runs filled 19 GB.
    Each rank maps all its peers' segments inside `init_distributed`, so after a barrier the
    names can go; the mappings stay valid and the memory is freed when the ranks exit."""
    dist.barrier()
    shm_allreduce_buffer(dist.get_rank()).unlink(missing_ok=True)


def free_port() -> int:
    """A free TCP port for a process group's master.

    Picked at random below the kernel's ephemeral range: a port the OS hands out itself (bind to
    0) comes from that range and can be handed out again, e.g. to one of gloo's connections,
    between this check and the launcher's own bind."""
    import random  # noqa: PLC0415
    import socket  # noqa: PLC0415
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    pick = random.SystemRandom()  # not the seeded global generator: every run its own port
    high = max(ephemeral_low, 2025)
    low = min(20000, high - 1000)
    for _ in range(64):
        port = pick.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
