"""OpenS2V loader throughput against decoding every frame then picking (`wanspeed bench data`).

Both paths produce the same video tensor (checked, max |diff| must be 0) with the same crop,
resize, conversion and subject cut-out; the loader asks decord for the sampled frames (plus the
annotated one) in one `get_batch`, the baseline decodes the whole clip and then picks (a copy of
the sampled full-size frames, as a decode-all loader makes). The split into decode and the rest is reported too, and the
DataLoader rate is measured in steady state (worker start-up excluded).

Runs on synthetic clips made on the spot, or on an existing OpenS2V part (`--json`,
`--video-base`), e.g. real data, whose clip lengths decide how much sparse decoding can save:
H.264 decodes every frame from the keyframe before the first sampled index to the last one, so a
clip spanned by the sampled frames (81 at stride 3 span 241) costs the same either way.

A bad first clip is an error naming it (the comparison needs it); a later bad clip is a counted,
logged skip, left out of every figure and listed in the output.
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from data.opens2v import MultiPartOpenS2VAdapterDataset, create_opens2v_dataloader
from data.skips import BadSample
from data.synthetic import make_demo_dataset
from data.video import crop_box, open_video, read_frames, video_to_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataBench:
    """What to time. Synthetic clips unless `json_path` (an existing OpenS2V annotation file) and
    `video_base` are given."""

    json_path: Optional[Path] = None
    video_base: Optional[Path] = None
    clips: int = 6                      # synthetic clips to make / clips to time
    source_frames: int = 300            # frames per synthetic clip
    source_height: int = 360
    source_width: int = 640
    height: int = 240                   # training size (480x832 in the seed config)
    width: int = 416
    num_training_frames: int = 21       # latent frames (21 -> 81 pixel frames)
    rounds: int = 2                     # timed passes over the clips (medians reported)
    workers: int = 2
    loader_batches: int = 0             # DataLoader batches timed after the first (0: 3 per worker)


def decode_all_then_pick(part, index: int) -> torch.Tensor:
    """Baseline: decode every frame of the clip, then pick the sampled ones and the annotated
    frame, with the same preprocessing and subject cut-out as the loader (BadSample if unreadable)."""
    plan, opt = part.plan(index), part.options
    path = part.video_base / plan.ann.video_relpath
    reader = open_video(path)
    every = read_frames(reader, path, range(len(reader)))
    part._subjects(plan, every[plan.ann.ann_frame_idx])
    return video_to_model(crop_box(every[plan.frame_indices], plan.ann.crop, str(path)), opt.height, opt.width)


def _interleaved_medians(paths: dict, n: int, rounds: int) -> tuple[dict[str, float], dict[int, BadSample]]:
    """Median seconds per clip of each path, the paths taking turns clip by clip so that machine
    noise (shared cores, page-cache state) hits them alike. A clip that any path finds bad is
    logged, left out of every path's times and returned as {clip index: BadSample}."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    bad: dict[int, BadSample] = {}
    for i in range(n * rounds):
        clip = i % n
        if clip in bad:
            continue
        clip_times = {}
        try:
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(clip)
                clip_times[name] = time.perf_counter() - t0
        except BadSample as err:
            log.warning("bench data: skipping bad clip %d (%s)", clip, err)
            bad[clip] = err
            continue
        for name, t in clip_times.items():
            times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}, bad


def _decode(part, sparse: bool):
    def decode(i: int) -> None:
        plan = part.plan(i)
        path = part.video_base / plan.ann.video_relpath
        reader = open_video(path)
        read_frames(reader, path, plan.frame_indices if sparse else range(len(reader)))
    return decode


def _loader_rate(ds, clips: list[int], workers: int, batches: int) -> float:
    """Clips/s of the DataLoader over `clips` once its workers are up: the clock starts after one
    batch per worker (the workers start their first batches together, so those arrive at once)."""
    warm = max(workers, 1)
    order = [clips[i % len(clips)] for i in range(batches + warm)]
    loader = create_opens2v_dataloader(ds, batch_size=1, sampler=order, num_workers=workers)
    it = iter(loader)
    for _ in range(warm):
        next(it)
    t0 = time.perf_counter()
    count = sum(b.video.shape[0] for b in it)
    return count / (time.perf_counter() - t0)


def _dataset(bench: DataBench, tmp: Path) -> tuple[MultiPartOpenS2VAdapterDataset, dict]:
    options = dict(num_training_frames=bench.num_training_frames, height=bench.height, width=bench.width)
    if bench.json_path is not None:
        if bench.video_base is None:
            raise SystemExit("--json needs --video-base")
        return (MultiPartOpenS2VAdapterDataset([bench.json_path], [bench.video_base], None, **options),
                {"data": str(bench.json_path)})
    t0 = time.perf_counter()
    demo = make_demo_dataset(tmp / "demo", clips=bench.clips, height=bench.source_height, width=bench.source_width,
                             frames=bench.source_frames, cross_frames=False)
    meta = {"data": "synthetic", "source_frames": bench.source_frames,
            "source_size": [bench.source_height, bench.source_width],
            "dataset_seconds": round(time.perf_counter() - t0, 2)}
    return MultiPartOpenS2VAdapterDataset(demo.json_paths, demo.video_base_paths, demo.background_base_paths,
                                          **options), meta


def bench_data(bench: DataBench) -> dict:
    """Time the loader against the decode-all baseline; returns the figures (what the JSON holds)."""
    with tempfile.TemporaryDirectory() as tmp:
        ds, meta = _dataset(bench, Path(tmp))
        part = ds.datasets[0]
        n = min(len(part), bench.clips)
        try:  # the timed paths have no skip-and-replace, and the comparison needs this clip
            ours = part.load(0)["video"]
            diff = (decode_all_then_pick(part, 0) - ours).abs().max().item()
        except BadSample as exc:
            raise SystemExit(f"bench data needs readable clips; the first one is bad: {exc}") from exc
        if diff > 0:
            raise SystemExit(f"loader and baseline disagree: max |diff| {diff:.3f}")
        paths = {"baseline": lambda i: decode_all_then_pick(part, i), "loader": part.load,
                 "decode_all": _decode(part, sparse=False), "decode_sampled": _decode(part, sparse=True)}
        s, bad = _interleaved_medians(paths, n, bench.rounds)
        good = [i for i in range(n) if i not in bad]
        batches = bench.loader_batches or 3 * max(bench.workers, 1)
        loader_rate = _loader_rate(ds, good, bench.workers, batches)
    return {**meta, "clips": len(good), "rounds": bench.rounds, "size": [bench.height, bench.width],
            "pixel_frames": int(ours.shape[1]), "max_abs_diff_vs_baseline": diff,
            "baseline_decode_all_s_per_clip": round(s["baseline"], 3), "loader_s_per_clip": round(s["loader"], 3),
            "speedup": round(s["baseline"] / s["loader"], 2),
            "decode_only_all_frames_s": round(s["decode_all"], 3),
            "decode_only_sampled_frames_s": round(s["decode_sampled"], 3),
            "workers": bench.workers, f"dataloader_{bench.workers}_workers_clips_per_s": round(loader_rate, 2),
            "torch_threads": torch.get_num_threads(),
            "skipped_bad_clips": len(bad), "skipped_clip_files": [bad[i].path for i in sorted(bad)]}
