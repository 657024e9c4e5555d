"""`wanspeed launch`: run a training command on every rank of a hostfile through `deepspeed`.

    wanspeed launch --hostfile H -- train --config C --logdir D
    wanspeed launch --hostfile H --no-ssh --node-rank R --master-addr A --master-port P -- train ...

The checks, the command line, `.deepspeed_env` and the SIGKILL message are library code
(launch/runner.py); `wanspeed doctor` shares these options.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the ranks run: the options `wanspeed launch` and `wanspeed doctor` share."""
    parser.add_argument("--hostfile", required=True, type=Path,
                        help="DeepSpeed hostfile: one '<host> slots=<N>' a line (it must exist)")
    parser.add_argument("--no-ssh", action="store_true",
                        help="no ssh between nodes: run one launcher per node with --node-rank (SLURM, Kubernetes)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's index in the hostfile (--no-ssh)")
    parser.add_argument("--master-addr", default=None, help="address of the first host (required with --no-ssh)")
    parser.add_argument("--master-port", type=int, default=29500, help="port of the process group's master (29500)")
    parser.add_argument("--include", default="", help="hosts/slots to use, DeepSpeed syntax: 'node-a@node-b:0,1'")
    parser.add_argument("--exclude", default="", help="hosts/slots to leave out (same syntax)")
    parser.add_argument("--num-nodes", type=int, default=-1, help="use the first N hosts of the hostfile")
    parser.add_argument("--num-gpus", type=int, default=-1, help="use slots 0..N-1 of every host")
    parser.add_argument("--ssh-port", type=int, default=None, help="ssh port of the other hosts")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a variable every rank gets (besides NCCL_*, GLOO_*, WANDB_*, ... of this shell)")


def plan_from(args: argparse.Namespace):
    from launch.environment import parse_assignments  # noqa: PLC0415
    from launch.runner import LaunchPlan  # noqa: PLC0415
    return LaunchPlan(hostfile=args.hostfile, no_ssh=args.no_ssh, node_rank=args.node_rank,
                      master_addr=args.master_addr, master_port=args.master_port, include=args.include,
                      exclude=args.exclude, num_nodes=args.num_nodes, num_gpus=args.num_gpus, ssh_port=args.ssh_port,
                      env=parse_assignments(args.env))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_plan_arguments(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after '--': the wanspeed command every rank runs, e.g. train --config C --logdir D")


def run(args: argparse.Namespace) -> int:
    from launch.environment import EnvFileError  # noqa: PLC0415
    from launch.hostfile import HostfileError  # noqa: PLC0415
    from launch.runner import LaunchError, launch  # noqa: PLC0415

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return launch(plan_from(args), command)
    except (HostfileError, LaunchError, EnvFileError) as err:
        print(f"wanspeed launch: error: {err}", file=sys.stderr)
        return 2
