"""`wanspeed launch`: check a multi-node launch, build DeepSpeed's command line and environment,
run it and explain a SIGKILLed rank.

Two modes, as DeepSpeed has them:
- ssh (the default): one `wanspeed launch` on any node; DeepSpeed's runner starts every node's
  ranks through pdsh. Every host must be reachable by passwordless ssh (checked first, each
  host by name) and the variables of `.deepspeed_env` (launch/environment.py) reach them all.
- no ssh (`no_ssh=True`): one `wanspeed launch` per node (SLURM's srun, a Kubernetes pod each)
  with that node's `node_rank` and the same hostfile, `master_addr` and `master_port`;
  launch/slurm_example.sbatch shows it.

Every rank runs `python -m ds_trainer.commands <command> ...` (the `wanspeed` dispatcher, started
by module name: launch/ never imports the trainer). The run's log dir must be on a filesystem
every node sees; the trainer checks that at start (launch/shared_fs.py).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from launch.environment import DEEPSPEED_ENV_FILE, deepspeed_env, write_env_file
from launch.hostfile import read_hostfile, select_resources
from launch.monitor import run_watched
from launch.run_sizes import configured_sizes, describe_sizes
from launch.ssh import unreachable_hosts, unreachable_message

log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500
"""torch.distributed's and DeepSpeed's default."""
DISPATCHER_MODULE = "ds_trainer.commands"
LAUNCHABLE = ("train",)
"""wanspeed commands that run on every rank under `wanspeed launch` (both jobs go through train)."""


class LaunchError(ValueError):
    """A launch that cannot start; the message is one line naming what is wrong."""


@dataclass
class LaunchPlan:
    """Where and how to start the ranks (the options of `wanspeed launch` / `wanspeed doctor`)."""

    hostfile: Path
    no_ssh: bool = False
    node_rank: Optional[int] = None
    """This node's index among the active hosts (no-ssh mode only)."""
    master_addr: Optional[str] = None
    """Address of the first active host as the others reach it (required without ssh)."""
    master_port: int = DEFAULT_MASTER_PORT
    include: str = ""
    exclude: str = ""
    num_nodes: int = -1
    num_gpus: int = -1
    ssh_port: Optional[int] = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra KEY=VALUE for every rank (--env)."""


def check_plan(plan: LaunchPlan) -> "OrderedDict[str, list[int]]":
    """The active hosts and slots; `HostfileError` / `LaunchError` (one line) when it cannot start."""
    resources = select_resources(read_hostfile(plan.hostfile), plan.include, plan.exclude, plan.num_nodes,
                                 plan.num_gpus)
    if not 0 < plan.master_port < 65536:
        raise LaunchError(f"--master-port must be in 1..65535, got {plan.master_port}")
    if plan.no_ssh:
        if plan.node_rank is None or plan.master_addr is None:
            raise LaunchError("--no-ssh needs --node-rank (this node's index in the hostfile) and --master-addr "
                              "(the first host's address)")
        if not 0 <= plan.node_rank < len(resources):
            raise LaunchError(f"--node-rank {plan.node_rank}: the launch has {len(resources)} nodes "
                              f"({', '.join(resources)}), so it must be in 0..{len(resources) - 1}")
    elif plan.node_rank is not None:
        raise LaunchError("--node-rank only applies with --no-ssh (with ssh one launcher starts every node)")
    return resources


def ssh_problems(plan: LaunchPlan, resources: Mapping[str, list[int]]) -> list[str]:
    """With ssh: one line for each host that passwordless ssh does not reach (DeepSpeed's runner
    ssh-checks a hostfile's first host even when it is the only one), and one if pdsh (its
    multi-node launcher) is missing where there are several nodes."""
    if plan.no_ssh:
        return []
    problems = [unreachable_message(h, p) for h, p in unreachable_hosts(list(resources), plan.ssh_port).items()]
    if len(resources) > 1 and shutil.which("pdsh") is None:
        problems.append("pdsh is not installed: DeepSpeed's multi-node launcher starts the remote ranks with it; "
                        "install pdsh on this node, or launch with --no-ssh (one launcher per node)")
    return problems


def check_ssh(plan: LaunchPlan, resources: Mapping[str, list[int]]) -> None:
    problems = ssh_problems(plan, resources)
    if problems:
        raise LaunchError(problems[0])


def deepspeed_command(plan: LaunchPlan, module: str, module_args: list[str],
                      python: str = sys.executable) -> list[str]:
    """`python -m deepspeed.launcher.runner ... --module <module> <args>` for `plan`."""
    cmd = [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(plan.hostfile),
           "--master_port", str(plan.master_port)]
    if plan.master_addr:
        cmd += ["--master_addr", plan.master_addr]
    if plan.no_ssh:
        cmd += ["--no_ssh", f"--node_rank={plan.node_rank}"]
    if plan.include:
        cmd += ["--include", plan.include]
    if plan.exclude:
        cmd += ["--exclude", plan.exclude]
    if plan.num_nodes > 0:
        cmd += ["--num_nodes", str(plan.num_nodes)]
    if plan.num_gpus > 0:
        cmd += ["--num_gpus", str(plan.num_gpus)]
    if plan.ssh_port is not None:
        cmd += ["--ssh_port", str(plan.ssh_port)]
    return cmd + ["--no_local_rank", "--module", module, *module_args]


def launch_environment(plan: LaunchPlan, environ: Mapping[str, str], env_file: Optional[Path]) -> dict[str, str]:
    """The runner's environment. With ssh the exported variables go into `env_file` (written here,
    DS_ENV_FILE points at it); without ssh each node passes its own environment plus --env."""
    env = dict(environ)
    if plan.no_ssh:
        env.update(plan.env)
        if env_file is not None and plan.node_rank == 0:  # a record of what reached the ranks
            write_env_file(env_file, deepspeed_env(env, {}))
    else:
        if env_file is None:
            raise LaunchError("a launch with ssh needs a file for the variables of every node")
        env["DS_ENV_FILE"] = str(write_env_file(env_file, deepspeed_env(environ, plan.env)).resolve())
    return env


def _logdir(command: list[str]) -> Optional[Path]:
    for i, arg in enumerate(command):
        if arg == "--logdir" and i + 1 < len(command):
            return Path(command[i + 1])
        if arg.startswith("--logdir="):
            return Path(arg.split("=", 1)[1])
    return None


def check_command(command: list[str]) -> Path:
    """The wanspeed command to run on every rank; returns its log dir."""
    if not command:
        raise LaunchError("no command to launch: put one after '--', e.g. -- train --config C --logdir D")
    if command[0] not in LAUNCHABLE:
        raise LaunchError(f"{command[0]!r} cannot be launched on every rank; launchable: {', '.join(LAUNCHABLE)}")
    logdir = _logdir(command)
    if logdir is None:
        raise LaunchError(f"{command[0]} needs --logdir (on a filesystem every node sees)")
    return logdir


def launch(plan: LaunchPlan, command: list[str], environ: Optional[Mapping[str, str]] = None) -> int:
    """Check everything that can be checked here, then run `command` on every rank of `plan`."""
    environ = os.environ if environ is None else environ
    logdir = check_command(command)
    resources = check_plan(plan)
    check_ssh(plan, resources)
    env = launch_environment(plan, environ, logdir / DEEPSPEED_ENV_FILE)
    cmd = deepspeed_command(plan, DISPATCHER_MODULE, command)
    world = sum(len(s) for s in resources.values())
    log.info("launching %d ranks on %d nodes (%s)%s: %s", world, len(resources), ", ".join(resources),
             f", this is node {plan.node_rank}" if plan.no_ssh else "", shlex.join(cmd))
    sizes = describe_sizes(configured_sizes(command), host_memory_gib())
    return exit_status(run_watched(cmd, env, sizes))


def host_memory_gib() -> Optional[float]:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except (ValueError, OSError):
        return None


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code (-N, killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode
