"""Process-group helpers shared by every job: joining the group the `deepspeed` launcher
started, picking a master port, releasing DeepSpeed's CPU shm segments, and the few collectives
the trainer and the checkpoints need (each a no-op in a world of one)."""
from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def process_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """Join the process group started by the `deepspeed` launcher (gloo on CPU, nccl on GPU);
    a plain `python` process becomes a world of one."""
    import deepspeed  # noqa: PLC0415  (slow import, only when a job starts)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend)
    release_shm_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size()


def all_reduce_scalar(value: float, op=dist.ReduceOp.SUM) -> float:
    """`value` reduced over every rank (float64 on the CPU, which gloo and nccl both take)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a collective: all ranks call it)."""
    return all_reduce_scalar(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shm_allreduce_buffer(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) creates for a
    rank: `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, 66 MB."""
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
