"""The program `wanspeed doctor` starts on every rank (through DeepSpeed's launcher, like a
training run, before any model exists):

    python -m launch.rank_check '{"dirs": {"logdir": "out/run"}, "mbytes": 16, "iters": 5, "timeout_s": 180}'

Each rank joins the process group (NCCL on GPUs, Gloo on CPU), its node's facts are gathered on
rank 0, a float32 all-reduce is checked for the right sum and timed, and every directory in
`dirs` is probed for being shared (launch/shared_fs.py). Rank 0 prints one line,
`REPORT_TAG <json>`, that launch/doctor.py reads.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from launch.checks import REPORT_TAG
from launch.node_facts import collect
from launch.shared_fs import shared_directory_problem

WARMUP_ITERS = 2


def allreduce_benchmark(mbytes: float, iters: int, device: torch.device) -> dict[str, Any]:
    """Time `iters` all-reduces of `mbytes` MiB of float32 after a warm-up; every rank contributes
    rank + 1, so the sum must be n(n+1)/2 everywhere. Bandwidths as nccl-tests defines them:
    algbw = bytes / time, busbw = algbw * 2 (n - 1) / n."""
    n, rank = dist.get_world_size(), dist.get_rank()
    numel = max(1, int(mbytes * 2 ** 20) // 4)
    buf = torch.empty(numel, dtype=torch.float32, device=device)
    times = []
    for i in range(WARMUP_ITERS + iters):
        buf.fill_(rank + 1)
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP_ITERS:
            times.append(time.perf_counter() - t0)
    expected = n * (n + 1) / 2
    correct = bool(torch.all(buf == expected).item())
    flags = [None] * n
    dist.all_gather_object(flags, correct)
    seconds = max(statistics.median(times), 1e-9)
    algbw = numel * 4 / seconds / 1e9
    return {"bytes": numel * 4, "iters": iters, "median_s": seconds, "algbw_gbps": algbw,
            "busbw_gbps": algbw * 2 * (n - 1) / n, "wrong_ranks": [r for r, ok in enumerate(flags) if not ok]}


def main(spec: dict[str, Any]) -> int:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=float(spec.get("timeout_s", 180))))
    try:
        facts = [None] * dist.get_world_size()
        dist.all_gather_object(facts, collect())
        bench = allreduce_benchmark(float(spec.get("mbytes", 16)), int(spec.get("iters", 5)), device)
        shared = {what: shared_directory_problem(path, what) for what, path in spec.get("dirs", {}).items()}
        if dist.get_rank() == 0:
            report = {"world_size": dist.get_world_size(), "backend": backend, "facts": facts,
                      "allreduce": bench, "shared": shared}
            print(f"{REPORT_TAG} {json.dumps(report)}", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
