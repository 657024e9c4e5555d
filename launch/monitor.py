"""Run the DeepSpeed launcher as a child, pass its output through, and explain how it ended.

A rank the kernel's out-of-memory killer (or a scheduler's memory limit) ends dies by SIGKILL,
and all DeepSpeed says is `exits with return code = -9`; its runner then exits with 247
(`sys.exit(-9)`). `run_watched` recognises that (the child's own -9, the launcher's line, or
exit status 247) and logs what it most likely was, with the run's configured sizes.
"""
from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
from typing import Mapping, Optional, TextIO

log = logging.getLogger(__name__)

KILLED_RANK = re.compile(r"return code = -9\b")
"""deepspeed.launcher.launch's line for a rank that died by SIGKILL."""
LAUNCHER_EXIT_AFTER_SIGKILL = 256 - signal.SIGKILL
"""The exit status of `sys.exit(-9)`: how DeepSpeed's launcher passes a rank's -9 on."""
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def sigkill_message(sizes: str) -> str:
    return (f"a training process was killed by SIGKILL (return code -9): most likely it ran out of host memory "
            f"(the kernel's OOM killer, or the scheduler's memory limit; `dmesg | grep -i oom` on the node tells). "
            f"Configured sizes: {sizes}. Lower batch_size, num_training_frames, height/width or num_workers; "
            f"--zero 3-offload keeps parameters and optimizer state in host RAM, so it needs more of it, not less")


def killed_by_sigkill(returncode: int, output_seen_kill: bool) -> bool:
    return returncode == -signal.SIGKILL or returncode == LAUNCHER_EXIT_AFTER_SIGKILL or output_seen_kill


def run_watched(cmd: list[str], env: Mapping[str, str], sizes: str, out: Optional[TextIO] = None,
                cwd: Optional[str] = None) -> int:
    """Run `cmd`, copying its output (stdout and stderr, merged) to `out` line by line; forward
    SIGINT / SIGTERM to it; returns its exit status, after logging the memory message when a
    process of the run was SIGKILLed."""
    out = out or sys.stdout
    proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    previous = {s: signal.getsignal(s) for s in FORWARDED_SIGNALS}

    def forward(signum, _frame):
        proc.send_signal(signum)

    if threading.current_thread() is threading.main_thread():  # signal handlers only exist there
        for s in FORWARDED_SIGNALS:
            signal.signal(s, forward)
    else:
        previous = {}
    seen_kill = False
    try:
        for line in proc.stdout:
            out.write(line)
            out.flush()
            seen_kill = seen_kill or bool(KILLED_RANK.search(line))
        returncode = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if killed_by_sigkill(returncode, seen_kill):
        log.error(sigkill_message(sizes))
    return returncode
