"""`wanspeed bench data`: OpenS2V loader throughput against decoding every frame then picking.

Both paths produce the same video tensor (checked, max |diff| must be 0) with the same crop,
resize, conversion and subject cut-out; the loader asks decord for the sampled frames (plus the
annotated one) in one `get_batch`, the baseline decodes the whole clip and then picks (a copy of
the sampled full-size frames, as a decode-all loader makes). The split into decode and the rest is reported too, and the
DataLoader rate is measured in steady state (worker start-up excluded).

Runs on synthetic clips made on the spot, or on an existing OpenS2V part (`--json`,
`--video-base`), e.g. real data, whose clip lengths decide how much sparse decoding can save:
H.264 decodes every frame from the keyframe before the first sampled index to the last one, so a
clip spanned by the sampled frames (81 at stride 3 span 241) costs the same either way.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data.opens2v import MultiPartOpenS2VAdapterDataset, create_opens2v_dataloader
from data.skips import BadSample
from data.synthetic import make_demo_dataset
from data.video import crop_box, open_video, read_frames, video_to_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="an existing OpenS2V annotation file (else synthetic)")
    parser.add_argument("--video-base", type=Path, default=None, help="its video base dir (with --json)")
    parser.add_argument("--clips", type=int, default=6, help="synthetic clips to make / clips to time")
    parser.add_argument("--source-frames", type=int, default=300, help="frames per synthetic clip")
    parser.add_argument("--source-height", type=int, default=360, help="synthetic video height")
    parser.add_argument("--source-width", type=int, default=640, help="synthetic video width")
    parser.add_argument("--height", type=int, default=240, help="training height (480 in the seed config)")
    parser.add_argument("--width", type=int, default=416, help="training width (832 in the seed config)")
    parser.add_argument("--num-training-frames", type=int, default=21, help="latent frames (21 -> 81 pixel frames)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the clips (medians reported)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=0,
                        help="DataLoader batches to time after the first (default: 3 per worker)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")


def decode_all_then_pick(part, index: int) -> torch.Tensor:
    """Baseline: decode every frame of the clip, then pick the sampled ones and the annotated
    frame, with the same preprocessing and subject cut-out as the loader."""
    plan, opt = part.plan(index), part.options
    path = part.video_base / plan.ann.video_relpath
    reader = open_video(path)
    every = reader.get_batch(list(range(len(reader)))).asnumpy()
    part._subjects(plan, every[plan.ann.ann_frame_idx])
    return video_to_model(crop_box(every[plan.frame_indices], plan.ann.crop, str(path)), opt.height, opt.width)


def _interleaved_medians(paths: dict, n: int, rounds: int) -> dict[str, float]:
    """Median seconds per clip of each path, the paths taking turns clip by clip so that machine
    noise (shared cores, page-cache state) hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(n * rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn(i % n)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _decode(part, sparse: bool):
    def decode(i: int) -> None:
        plan = part.plan(i)
        path = part.video_base / plan.ann.video_relpath
        reader = open_video(path)
        read_frames(reader, path, plan.frame_indices if sparse else range(len(reader)))
    return decode


def _loader_rate(ds, n: int, workers: int, batches: int) -> float:
    """Clips/s of the DataLoader once its workers are up: the clock starts after one batch per
    worker (the workers start their first batches together, so those arrive at once)."""
    warm = max(workers, 1)
    order = [i % n for i in range(batches + warm)]
    loader = create_opens2v_dataloader(ds, batch_size=1, sampler=order, num_workers=workers)
    it = iter(loader)
    for _ in range(warm):
        next(it)
    t0 = time.perf_counter()
    count = sum(b.video.shape[0] for b in it)
    return count / (time.perf_counter() - t0)


def _dataset(args: argparse.Namespace, tmp: Path) -> tuple[MultiPartOpenS2VAdapterDataset, dict]:
    options = dict(num_training_frames=args.num_training_frames, height=args.height, width=args.width)
    if args.json is not None:
        if args.video_base is None:
            raise SystemExit("--json needs --video-base")
        return MultiPartOpenS2VAdapterDataset([args.json], [args.video_base], None, **options), {"data": str(args.json)}
    t0 = time.perf_counter()
    demo = make_demo_dataset(tmp / "demo", clips=args.clips, height=args.source_height, width=args.source_width,
                             frames=args.source_frames, cross_frames=False)
    meta = {"data": "synthetic", "source_frames": args.source_frames,
            "source_size": [args.source_height, args.source_width],
            "dataset_seconds": round(time.perf_counter() - t0, 2)}
    return MultiPartOpenS2VAdapterDataset(demo.json_paths, demo.video_base_paths, demo.background_base_paths,
                                          **options), meta


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        ds, meta = _dataset(args, Path(tmp))
        part = ds.datasets[0]
        n = min(len(part), args.clips)
        try:
            ours = part.load(0)["video"]
        except BadSample as exc:  # the timed paths have no skip-and-replace: they need readable clips
            raise SystemExit(f"bench data needs readable clips; the first one is bad: {exc}") from exc
        diff = (decode_all_then_pick(part, 0) - ours).abs().max().item()
        if diff > 0:
            raise SystemExit(f"loader and baseline disagree: max |diff| {diff:.3f}")
        paths = {"baseline": lambda i: decode_all_then_pick(part, i), "loader": part.load,
                 "decode_all": _decode(part, sparse=False), "decode_sampled": _decode(part, sparse=True)}
        s = _interleaved_medians(paths, n, args.rounds)
        batches = args.loader_batches or 3 * max(args.workers, 1)
        loader_rate = _loader_rate(ds, n, args.workers, batches)
    figures = {**meta, "clips": n, "rounds": args.rounds, "size": [args.height, args.width],
               "pixel_frames": int(ours.shape[1]), "max_abs_diff_vs_baseline": diff,
               "baseline_decode_all_s_per_clip": round(s["baseline"], 3), "loader_s_per_clip": round(s["loader"], 3),
               "speedup": round(s["baseline"] / s["loader"], 2),
               "decode_only_all_frames_s": round(s["decode_all"], 3),
               "decode_only_sampled_frames_s": round(s["decode_sampled"], 3),
               "workers": args.workers, f"dataloader_{args.workers}_workers_clips_per_s": round(loader_rate, 2),
               "torch_threads": torch.get_num_threads()}
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0
