"""Real multi-process training runs: `deepspeed` launcher, 2 CPU ranks, gloo."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_trainer.commands import cache as cache_cmd
from ds_trainer.demo import REPO, prepare
from ds_trainer.distributed import free_port


@pytest.fixture(scope="session")
def demo_config(tmp_path_factory):
    """Tiny data (4 clips), encoders, base weights and a filled encoder cache."""
    root = tmp_path_factory.mktemp("trainer")
    config = prepare(root, clips=4)
    cache_cmd.run(argparse.Namespace(config=str(config), shard_size=8, local_rank=None))
    return config


def launch(config, logdir, ranks=2, zero="3", sets=(), extra=(), env=None, wait=True, module="ds_trainer.train"):
    """Start `deepspeed --num_gpus N --module <module>` on CPU; returns the Popen."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(port), "--module", module, "--config", str(config), "--logdir", str(logdir),
           "--zero", zero, "--disable-wandb", *extra]
    for s in sets:
        cmd += ["--set", s]
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANSPEED_NO_PROGRESS="1",
                    PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    proc.port = port
    if wait:
        out, _ = proc.communicate(timeout=600)
        proc.output = out
    return proc


def kill_group(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def losses(logdir):
    from ds_trainer.metrics import read_metrics
    return [r["loss"] for r in read_metrics(Path(logdir))]


def wait_for(path: Path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def finished(proc) -> dict:
    assert proc.returncode == 0, proc.output[-4000:]
    line = [ln for ln in proc.output.splitlines() if ln.startswith('{"finished"')]
    assert line, proc.output[-3000:]
    return json.loads(line[-1])["finished"]
