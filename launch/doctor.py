"""`wanspeed doctor`: check a multi-node setup before any model is loaded.

In order, stopping at the first check the later ones need:
1. the hostfile (launch/hostfile.py: one line naming the file and line) and the launch options;
2. ssh: every host reachable by passwordless ssh, or `--no-ssh` explained;
3. a smoke test on every rank, started the way `wanspeed launch` starts training
   (launch/rank_check.py): versions, GPUs, interfaces and NCCL / Gloo variables of every node,
   an all-reduce checked and timed, and each given directory (log dir, cache) probed for being
   one filesystem every node sees. Without ssh, run the doctor on every node with the same
   options (and each node's --node-rank); node 0 prints the report.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Mapping, Optional

from launch.checks import FAIL, OK, REPORT_TAG, Finding, report_findings
from launch.environment import DEEPSPEED_ENV_FILE
from launch.hostfile import HostfileError
from launch.monitor import run_watched
from launch.runner import LaunchError, LaunchPlan, check_plan, deepspeed_command, launch_environment, ssh_problems

SMOKE_TEST_MODULE = "launch.rank_check"
OUTPUT_TAIL_LINES = 25


def preflight(plan: LaunchPlan) -> tuple[list[Finding], Optional[dict]]:
    """Hostfile and ssh findings, and the active resources (None when the smoke test cannot run)."""
    try:
        resources = check_plan(plan)
    except (HostfileError, LaunchError) as err:
        return [Finding(FAIL, "hostfile", str(err))], None
    slots = ", ".join(f"{h}: {len(s)}" for h, s in resources.items())
    out = [Finding(OK, "hostfile", f"{plan.hostfile}: {len(resources)} hosts, "
                                   f"{sum(map(len, resources.values()))} ranks ({slots})")]
    if plan.no_ssh:
        out.append(Finding(OK, "ssh", "not used (--no-ssh): each node runs its own launcher; run this doctor on "
                                      "every node with its --node-rank, node 0 prints the report"))
    else:
        problems = ssh_problems(plan, resources)
        out += [Finding(FAIL, "ssh", p) for p in problems]
        if problems:
            return out, None
        out.append(Finding(OK, "ssh", "every host answers passwordless ssh"))
    return out, resources


def parse_report(output: str) -> Optional[dict]:
    for line in output.splitlines():
        if line.startswith(REPORT_TAG + " "):
            return json.loads(line[len(REPORT_TAG) + 1:])
    return None


def smoke_test(plan: LaunchPlan, dirs: Mapping[str, Optional[str]], mbytes: float, iters: int, timeout_s: float,
               environ: Mapping[str, str]) -> tuple[int, str]:
    """Run launch/rank_check.py on every rank of `plan`; (exit status, its output)."""
    spec = {"dirs": {k: str(v) for k, v in dirs.items() if v is not None}, "mbytes": mbytes, "iters": iters,
            "timeout_s": timeout_s}
    with tempfile.TemporaryDirectory(prefix="wanspeed-doctor-") as tmp:
        env = launch_environment(plan, environ, None if plan.no_ssh else Path(tmp) / DEEPSPEED_ENV_FILE)
        buffer = io.StringIO()
        code = run_watched(deepspeed_command(plan, SMOKE_TEST_MODULE, [json.dumps(spec)]), env,
                           sizes=f"all-reduce of {mbytes} MiB", out=buffer)
    return code, buffer.getvalue()


def run_doctor(plan: LaunchPlan, dirs: Mapping[str, Optional[str]], environ: Mapping[str, str], mbytes: float = 16,
               iters: int = 5, timeout_s: float = 180) -> list[Finding]:
    findings, resources = preflight(plan)
    if resources is None:
        return findings
    code, output = smoke_test(plan, dirs, mbytes, iters, timeout_s, environ)
    report = parse_report(output)
    if report is not None:
        return findings + report_findings(report)
    tail = "\n".join(output.splitlines()[-OUTPUT_TAIL_LINES:])
    if code == 0 and plan.no_ssh and plan.node_rank != 0:
        return findings + [Finding(OK, "smoke test", f"node {plan.node_rank}'s ranks passed; node 0 prints the report")]
    return findings + [Finding(FAIL, "smoke test", f"the ranks did not finish (exit status {code}); last output:\n{tail}")]
