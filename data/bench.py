"""`wanspeed bench data`: OpenS2V loader throughput against decoding every frame then picking.

Both paths produce the same video tensor (checked); the loader decodes only the sampled frames
with decord `get_batch`, the baseline decodes the whole clip first (what a naive loader does).
Runs on synthetic data made on the spot (clips long enough that frame sampling matters, like
real OpenS2V clips of several hundred frames), in one process and through a DataLoader.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from data.opens2v import MultiPartOpenS2VAdapterDataset, create_opens2v_dataloader
from data.sampler import ResumableDistributedSampler
from data.synthetic import make_demo_dataset
from data.video import crop_box, frames_to_model, open_video


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--source-frames", type=int, default=300, help="frames per synthetic clip")
    parser.add_argument("--source-height", type=int, default=360, help="synthetic video height")
    parser.add_argument("--source-width", type=int, default=640, help="synthetic video width")
    parser.add_argument("--height", type=int, default=240, help="training height (480 in the seed config)")
    parser.add_argument("--width", type=int, default=416, help="training width (832 in the seed config)")
    parser.add_argument("--num-training-frames", type=int, default=21, help="latent frames (21 -> 81 pixel frames)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")


def decode_all_then_pick(part, index: int) -> torch.Tensor:
    """Baseline: decode every frame of the clip, then pick the sampled ones and the annotated
    frame, with the same preprocessing and subject cut-out as the loader."""
    plan, opt = part.plan(index), part.options
    path = part.video_base / plan.ann.video_relpath
    reader = open_video(path)
    every = reader.get_batch(list(range(len(reader)))).asnumpy()
    clip = crop_box(every[plan.frame_indices], plan.ann.crop, str(path))
    part._subjects(plan, every[plan.ann.ann_frame_idx])
    return frames_to_model(clip, opt.height, opt.width).permute(1, 0, 2, 3)


def _rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        demo = make_demo_dataset(Path(tmp) / "demo", clips=args.clips, height=args.source_height, width=args.source_width,
                                 frames=args.source_frames, cross_frames=False)
        made = time.perf_counter() - t0
        ds = MultiPartOpenS2VAdapterDataset(demo.json_paths, demo.video_base_paths, demo.background_base_paths,
                                            num_training_frames=args.num_training_frames, height=args.height,
                                            width=args.width)
        part = ds.datasets[0]
        n = len(part)
        ours = part.load(0)["video"]
        diff = (decode_all_then_pick(part, 0) - ours).abs().max().item()
        if diff > 0:
            raise SystemExit(f"loader and baseline disagree: max |diff| {diff:.3f}")
        base_rate = _rate(lambda i: decode_all_then_pick(part, i % n), n)
        video_rate = _rate(lambda i: part.load(i % n), n)
        sampler = ResumableDistributedSampler(len(ds), seed=0)
        loader = create_opens2v_dataloader(ds, batch_size=1, sampler=sampler, num_workers=args.workers)
        t0 = time.perf_counter()
        count = sum(b.video.shape[0] for b in loader)
        loader_rate = count / (time.perf_counter() - t0)
    figures = {"clips": args.clips, "source_frames": args.source_frames,
               "source_size": [args.source_height, args.source_width], "size": [args.height, args.width],
               "max_abs_diff_vs_baseline": diff,
               "pixel_frames": int(ours.shape[1]), "workers": args.workers, "dataset_seconds": round(made, 2),
               "baseline_decode_all_clips_per_s": round(base_rate, 2), "loader_clips_per_s": round(video_rate, 2),
               "speedup": round(video_rate / base_rate, 2),
               f"dataloader_{args.workers}_workers_clips_per_s": round(loader_rate, 2),
               "torch_threads": torch.get_num_threads()}
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0
