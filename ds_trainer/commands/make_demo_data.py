"""`wanspeed make-demo-data`: a small synthetic dataset in the exact OpenS2V on-disk layout
(data/synthetic.py), and the config snippet that points a run at it."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset root (created)")
    parser.add_argument("--clips", type=int, default=8, help="number of clips (default 8)")
    parser.add_argument("--parts", type=int, default=1, help="parts demo_part1..K, <= clips (default 1)")
    parser.add_argument("--height", type=int, default=96, help="frame height in pixels, even (default 96)")
    parser.add_argument("--width", type=int, default=160, help="frame width in pixels, even (default 160)")
    parser.add_argument("--frames", type=int, default=49, help="frames per clip (default 49)")
    parser.add_argument("--fps", type=float, default=16, help="frames per second (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="everything is deterministic in it (default 0)")
    parser.add_argument("--old-variants", action=argparse.BooleanOptionalAction, default=None,
                        help="write every 4th clip in the older annotation variant (default: when clips >= 4)")
    parser.add_argument("--no-cross-frames", dest="cross_frames", action="store_false",
                        help="skip step 6 (cluster file and cross-frame pairs)")


def run(args: argparse.Namespace) -> int:
    from data.synthetic import make_demo_dataset  # noqa: PLC0415

    try:
        dataset = make_demo_dataset(args.out, args.clips, args.parts, args.height, args.width, args.frames,
                                    args.fps, args.seed, args.old_variants, args.cross_frames)
    except ValueError as err:
        log.error("%s", err)
        return 2
    lines = [f"wrote {sum(map(len, dataset.keys))} clips under {dataset.root}:"]
    for name, keys, json_path in zip(dataset.parts, dataset.keys, dataset.json_paths):
        lines.append(f"  {name}: {len(keys)} mp4 + {len(keys)} background png, annotations {json_path}")
    if dataset.cluster_path is not None:
        n = len(json.loads(dataset.cluster_path.read_text()))
        lines.append(f"  step 6: {n} clusters in {dataset.cluster_path}, pairs in {dataset.cross_frames_base_path}")
    lines += ["", "config snippet:", dataset.config_snippet()]
    print("\n".join(lines))
    return 0
