"""Two "nodes" on one machine: hostfile `node-a slots=1` / `node-b slots=1`, one `wanspeed`
launcher per node with --no-ssh, all on 127.0.0.1 (gloo on CPU)."""
import os
import subprocess
import sys
from pathlib import Path

from ds_trainer.demo import REPO
from ds_trainer.distributed import free_port

TWO_NODES = "# two nodes on this machine\nnode-a slots=1\nnode-b slots=1\n"


def write_hostfile(directory: Path, text: str = TWO_NODES) -> Path:
    path = directory / "hostfile"
    path.write_text(text)
    return path


def node_env(**extra) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANSPEED_NO_PROGRESS="1",
                PYTHONPATH=str(REPO), **extra)


def run_two_nodes(command: str, hostfile: Path, args: list[str], cwds=(REPO, REPO), env=None, timeout=600):
    """`wanspeed <command> --hostfile H --no-ssh --node-rank R ... <args>` for R = 0, 1 at once;
    [(exit status, output)] per node."""
    port = free_port()
    procs = []
    for rank, cwd in enumerate(cwds):
        cmd = [sys.executable, "-m", "ds_trainer.commands", command, "--hostfile", str(hostfile), "--no-ssh",
               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env or node_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, 9)
            raise
        results.append((proc.returncode, out))
    return results
