"""Passwordless-ssh reachability of the hosts of a launch (DeepSpeed's runner checks only the
first host, and only says it failed)."""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

CONNECT_TIMEOUT_S = 5
NO_SSH_HINT = ("without passwordless ssh between nodes, start one launcher per node with --no-ssh --node-rank R "
               "--master-addr A --master-port P (launch/slurm_example.sbatch does this under SLURM)")


def ssh_problem(host: str, port: Optional[int] = None, timeout_s: int = CONNECT_TIMEOUT_S) -> Optional[str]:
    """None when `ssh host true` works without a password; else why not, in one line."""
    if shutil.which("ssh") is None:
        return "ssh is not installed on this node"
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}", "-o", "StrictHostKeyChecking=accept-new"]
    if port is not None:
        cmd += ["-p", str(port)]
    try:
        done = subprocess.run(cmd + [host, "true"], capture_output=True, text=True, timeout=timeout_s + 5,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"ssh to {host} did not answer in {timeout_s + 5} s"
    if done.returncode == 0:
        return None
    detail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return detail


def unreachable_hosts(hosts: list[str], port: Optional[int] = None) -> dict[str, str]:
    """host -> why it cannot be reached by passwordless ssh, checked in parallel."""
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(hosts)))) as pool:
        problems = dict(zip(hosts, pool.map(lambda h: ssh_problem(h, port), hosts)))
    return {h: p for h, p in problems.items() if p is not None}


def unreachable_message(host: str, problem: str) -> str:
    return f"host {host!r} is not reachable by passwordless ssh ({problem}); {NO_SSH_HINT}"
