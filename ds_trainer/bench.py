"""`wanspeed bench kernels|data`: dispatch to the kernel or the data-loader benchmarks."""
from __future__ import annotations

import argparse
import importlib

TARGETS = {"kernels": "kernels.bench.cli", "data": "data.bench"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=sorted(TARGETS), help="kernels: attention/extension microbenchmarks; "
                        "data: OpenS2V loader throughput")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (--help for them)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(TARGETS[args.what])
    parser = argparse.ArgumentParser(prog=f"wanspeed bench {args.what}")
    module.add_arguments(parser)
    rest = list(args.rest)
    if args.what == "kernels":
        rest = ["kernels"] + rest  # kernels.bench.cli takes the positional too
    return int(module.run(parser.parse_args(rest)) or 0)

