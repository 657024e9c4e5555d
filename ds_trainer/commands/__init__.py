"""`wanspeed` command line: every subcommand's options live here, one module per subcommand.

A subcommand module defines `add_arguments(parser)` and `run(args) -> int` and is imported only
when its command runs (so `wanspeed --help` imports no heavy library). Library modules take
plain arguments and parse nothing.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

# name -> (module under ds_trainer.commands, one-line help); later jobs add rows here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the main job on its tiny default: synthetic data, 2-rank ZeRO-3 training on CPU, plot, mp4 (~1 min)"),
    "train": ("train", "train the job a config names (adapters or DMD; launch with deepspeed, or plain for debugging)"),
    "cache": ("cache", "precompute T5 / CLIP / VAE outputs so training loads no encoder"),
    "sample": ("sample", "an mp4 from a checkpoint: subject-reference (UniPC / Euler, CFG) or causal I2V through the KV cache"),
    "plot": ("plot", "loss-curve PNG of a run directory"),
    "info": ("info", "versions, attention backends and model presets on this machine"),
    "bench": ("bench", "benchmarks: kernels (side by side with the stock paths), data (loader clips/s), compile (sm_90/sm_100 gate)"),
    "make-demo-data": ("make_demo_data", "write a small synthetic dataset in the OpenS2V on-disk layout"),
    "build-kernels": ("build_kernels", "build the C++/CUDA extension ahead of time (ninja)"),
    "launch": ("launch", "run `train` on every node of a hostfile through deepspeed (ssh, or --no-ssh per node)"),
    "doctor": ("doctor", "check a hostfile, ssh, versions, NCCL variables, an all-reduce and the shared log dir"),
    "plan-memory": ("plan_memory", "per-GPU memory under ZeRO-2 / 3 / 3+offload, frozen-aware; the config that fits"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: wanspeed <command> [options]\n\ncommands:\n{rows}\n\n'wanspeed <command> --help' for a command's options."


def command_module(name: str):
    """The module of command `name` (imports it)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"wanspeed: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = command_module(name)
    parser = argparse.ArgumentParser(prog=f"wanspeed {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)
