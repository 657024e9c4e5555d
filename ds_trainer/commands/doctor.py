"""`wanspeed doctor`: check a hostfile, ssh, versions, interfaces, an all-reduce and the shared
filesystem before a multi-node run (launch/doctor.py); takes `wanspeed launch`'s options."""
from __future__ import annotations

import argparse
import os
import sys

from ds_trainer.commands.launch import add_plan_arguments, plan_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_plan_arguments(parser)
    parser.add_argument("--logdir", default=None, help="the run's log dir: checked to be one directory on every node")
    parser.add_argument("--cache-dir", default=None, help="the encoder cache: checked the same way")
    parser.add_argument("--mbytes", type=float, default=16, help="all-reduce size in MiB (16)")
    parser.add_argument("--iters", type=int, default=5, help="timed all-reduces (5, after 2 warm-up)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for every rank to join (180)")


def run(args: argparse.Namespace) -> int:
    from launch.checks import FAIL  # noqa: PLC0415
    from launch.doctor import run_doctor  # noqa: PLC0415
    from launch.environment import EnvFileError  # noqa: PLC0415

    try:
        plan = plan_from(args)
    except EnvFileError as err:
        print(f"wanspeed doctor: error: {err}", file=sys.stderr)
        return 2
    findings = run_doctor(plan, {"logdir": args.logdir, "cache_dir": args.cache_dir}, os.environ, args.mbytes,
                          args.iters, args.timeout)
    for finding in findings:
        print(finding.line())
    return 1 if any(f.level == FAIL for f in findings) else 0
