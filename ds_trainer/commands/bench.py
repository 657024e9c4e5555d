"""`wanspeed bench kernels|causal-block|data|compile`: the kernel microbenchmarks
(kernels/bench/runner.py), a Wan-shaped causal generator timed per block through its KV cache for
each attention backend (model/causal_bench.py), the data-loader benchmark (data/bench.py), or the
compile gate (kernels/compile_gate.py: registers, spills, shared memory for sm_90 / sm_100 without a
GPU), one sub-parser each."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def _kernels_arguments(parser: argparse.ArgumentParser) -> None:
    from kernels.bench.runner import BENCHES, all_shape_sets  # noqa: PLC0415  (imports the bench modules)

    parser.add_argument("--shapes", choices=all_shape_sets(), default=None,
                        help="shape set (default: wan-1.3b on a GPU, tiny on CPU); a set runs on the benches "
                             "that define it")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of {sorted(BENCHES)}")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default kernels/bench/results/<device>-<shapes>.json)")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    """Defaults live in data.bench.DataBench (not imported here: `bench kernels` needs no data stack)."""
    parser.add_argument("--json", dest="json_path", metavar="JSON", type=Path,
                        help="an existing OpenS2V annotation file (else synthetic)")
    parser.add_argument("--video-base", type=Path, help="its video base dir (with --json)")
    parser.add_argument("--clips", type=int, help="synthetic clips to make / clips to time")
    parser.add_argument("--source-frames", type=int, help="frames per synthetic clip")
    parser.add_argument("--source-height", type=int, help="synthetic video height")
    parser.add_argument("--source-width", type=int, help="synthetic video width")
    parser.add_argument("--height", type=int, help="training height (480 in the seed config)")
    parser.add_argument("--width", type=int, help="training width (832 in the seed config)")
    parser.add_argument("--num-training-frames", type=int, help="latent frames (21 -> 81 pixel frames)")
    parser.add_argument("--rounds", type=int, help="timed passes over the clips (medians reported)")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--loader-batches", type=int, help="DataLoader batches to time after the first (default: 3 per worker)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")


def _causal_block_arguments(parser: argparse.ArgumentParser) -> None:
    """Shape names restated here (model.causal_bench imports the model stack; parsing needs none of it)."""
    parser.add_argument("--shapes", choices=("tiny", "wan-1.3b", "wan-1.3b-longlive"), default=None,
                        help="default: wan-1.3b (21 latent frames at 480x832, 3 a block) on a GPU, tiny on CPU")
    parser.add_argument("--frames", type=int, help="latent frames of the rollout")
    parser.add_argument("--block", type=int, help="latent frames per block")
    parser.add_argument("--window", type=int, help="local_attn_size (-1: every earlier frame)")
    parser.add_argument("--sink", type=int, help="sink frames (with --window)")
    parser.add_argument("--backends", nargs="+", default=["sdpa", "triton"], help="attention backends (default sdpa triton)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts (medians per block)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default kernels/bench/results/<device>-causal-block-<shapes>.json)")


def _compile_arguments(parser: argparse.ArgumentParser) -> None:
    """Choices restated here (kernels.compile_gate imports triton lazily; parsing needs none of it)."""
    parser.add_argument("--arch", default="sm_90,sm_100", help="comma-separated architectures (sm_90, sm_100)")
    parser.add_argument("--shapes", choices=("wan-1.3b", "wan-14b"), default="wan-1.3b", help="model shapes")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated (bf16, fp16)")
    parser.add_argument("--kept-only", action="store_true", help="only the configs the register prune keeps")
    parser.add_argument("--no-extension", action="store_true", help="skip nvcc on kernels/csrc/*.cu")
    parser.add_argument("--processes", type=int, default=2, help="parallel compilers (default 2)")
    parser.add_argument("--update-table", action="store_true",
                        help="rewrite kernels/measured_spills.json (the autotune prune's compiler verdicts) from this run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default kernels/bench/results/compile-<shapes>.json)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="{data,kernels,causal-block,compile}")
    _data_arguments(sub.add_parser("data", help="OpenS2V loader throughput against decoding every frame",
                                   description="OpenS2V loader clips/s against decoding every frame then picking"))
    _kernels_arguments(sub.add_parser("kernels", help="attention/extension microbenchmarks",
                                      description="every kernel microbenchmark, side by side with the stock paths"))
    _causal_block_arguments(sub.add_parser("causal-block", help="a causal Wan, ms per block through the KV cache",
                                           description="a Wan-shaped block-causal generator with random weights, "
                                                       "timed block by block per attention backend"))
    _compile_arguments(sub.add_parser("compile", help="compile every kernel/config for sm_90, sm_100 (no GPU needed)",
                                      description="registers, spills and shared memory of every Triton kernel at "
                                                  "every autotune config, and of the CUDA extension"))


def _run_kernels(args: argparse.Namespace) -> int:
    from kernels.bench.harness import format_table  # noqa: PLC0415
    from kernels.bench.runner import run_benches  # noqa: PLC0415

    try:
        rows, out = run_benches(args.shapes, args.only, args.out)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    print(format_table(rows))
    print(f"results written to {out}")
    return 0


def _run_data(args: argparse.Namespace) -> int:
    from data.bench import DataBench, bench_data  # noqa: PLC0415

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataBench) if getattr(args, f.name) is not None}
    figures = bench_data(DataBench(**given))
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _run_causal_block(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from kernels.bench.harness import default_shapes  # noqa: PLC0415
    from model.causal_bench import bench_causal_block, format_rows, write_results  # noqa: PLC0415

    shapes = args.shapes or default_shapes(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {k: v for k, v in (("frames", args.frames), ("block", args.block), ("window", args.window),
                                   ("sink", args.sink)) if v is not None}
    try:
        rows = bench_causal_block(shapes, args.backends, repeats=args.repeats, overrides=overrides)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    print(format_rows(rows))
    print(f"results written to {write_results(rows, shapes, args.out)}")
    return 0 if all(r.error is None for r in rows) else 1


def _run_compile(args: argparse.Namespace) -> int:
    from kernels.compile_gate import compile_gate, format_summary, format_table  # noqa: PLC0415

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        report = compile_gate(split(args.arch), args.shapes, split(args.dtypes), kept_only=args.kept_only,
                              extension=not args.no_extension, processes=args.processes, out=args.out,
                              progress=True, update_table=args.update_table)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    print(format_table(report["rows"] + report["extension"]))
    print()
    print(format_summary(report["summary"]))
    print(f"{len(report['rows']) + len(report['extension'])} compiles in {report['seconds']} s; "
          f"results written to {report['path']}")
    for failure in report["failures"]:
        print(f"FAIL: {failure}")
    return 1 if report["failures"] else 0


def run(args: argparse.Namespace) -> int:
    return {"kernels": _run_kernels, "causal-block": _run_causal_block, "data": _run_data,
            "compile": _run_compile}[args.what](args)
