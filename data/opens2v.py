"""OpenS2V subject-to-video datasets (names as in the OpenS2V seed guide).

A sample: `num_training_frames` latent frames' worth of pixel frames (4 (n - 1) + 1) sampled from
the clip's `face_cut` range with `sample_stride`, decoded with decord (only those frames),
cropped with `metadata.crop`, cover-resized to height x width in [-1, 1]; the subject image(s)
cut out of the annotated frame with their COCO RLE masks (on white), letterboxed to the
reference size; the caption; the key and scores. Random choices (frame start, random subjects)
are drawn from (seed, epoch, index), so a resumed run sees exactly the same samples.

A bad sample (see data/skips.py) is replaced by the next good index and counted; the replacement
keeps every rank's batch count equal.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.annotations import ClipAnnotation, SubjectAnnotation, load_annotation_file, parse_entry
from data.batch import OpenS2VBatch, stack_for_transfer
from data.cross_frames import CrossFramePairs
from data.options import DatasetOptions
from data.paths import resolve_under
from data.skips import BadSample, SkipLedger, TooManyBadSamples
from data.subjects import cut_out, decode_mask, frame_for_mask, letterbox, select_subjects
from data.video import (crop_box, empty_for_transfer, image_to_model, load_clip, load_rgb_image, open_video,
                        pixel_frames, read_frames, sample_frame_indices)

log = logging.getLogger(__name__)
MAX_REPLACEMENT_TRIES = 64  # consecutive bad samples tolerated while looking for a replacement


@dataclass
class SamplePlan:
    """What a sample will be: its clip, frame indices, and the clip and subjects of its reference."""

    ann: ClipAnnotation
    frame_indices: np.ndarray
    subject_source: ClipAnnotation
    subjects: list[SubjectAnnotation]

    def fingerprint(self, options: DatasetOptions, extra: str = "") -> str:
        """Content hash of everything that determines the sample's encoder outputs."""
        payload = dict(key=self.ann.key, prompt=self.ann.caption, frames=self.frame_indices.tolist(),
                       size=[options.height, options.width], ref_size=list(options.reference_size),
                       ref=[self.subject_source.key] + [s.ann_id for s in self.subjects], crop=self.ann.crop,
                       video=self.ann.video_relpath, extra=extra)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class OpenS2VAdapterDataset(Dataset):
    """One OpenS2V dataset part: an annotation JSON, its video directory and its backgrounds."""

    def __init__(self, json_path: str | Path, video_base_path: str | Path, background_base_path: str | Path | None,
                 options: Optional[DatasetOptions] = None, cross_frames: Optional[CrossFramePairs] = None,
                 **option_overrides: Any):
        """options: the `opens2v:` section (its sampling fields: this part's paths are the
        arguments) with the geometry and seed; or flat `option_overrides` (DatasetOptions.build)."""
        self.options = options or DatasetOptions.build(**option_overrides)
        self.json_path = Path(json_path)
        self.video_base = Path(video_base_path)
        self.background_base = Path(background_base_path) if background_base_path else None
        if not self.video_base.is_dir():
            raise ValueError(f"opens2v.video_base_paths: {self.video_base} is not a directory")
        self.entries = load_annotation_file(self.json_path)
        self.keys = sorted(self.entries)
        if not self.keys:
            raise ValueError(f"{self.json_path}: no clips in the annotation file")
        self.cross_frames = cross_frames
        if self.options.is_cross_frame and cross_frames is None:
            raise ValueError("opens2v.is_cross_frame needs the step-6 cross-frame files "
                             "(cross_frames_cluster_path / cross_frames_base_path)")
        self.ledger = SkipLedger(max_bad_fraction=self.options.section.max_bad_fraction)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed the per-sample random choices for a new epoch (call before iterating)."""
        self.epoch = epoch

    def annotation(self, index: int) -> ClipAnnotation:
        key = self.keys[index]
        return parse_entry(key, self.entries[key], str(self.json_path))

    # ------------------------------------------------------------------------------- sampling
    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch's samples (what a DataLoader worker asks for), each video decoded straight into
        its row of one batch buffer (shared memory in a worker): collating them copies nothing."""
        videos = empty_for_transfer((len(indices), *self.video_shape))
        return [self.get(i, video_out=videos[k]) for k, i in enumerate(indices)]

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        o = self.options
        return 3, pixel_frames(o.num_training_frames), o.height, o.width

    def get(self, index: int, video_out: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Sample `index`, or the next good one (counted in the ledger); `video_out` [3, T, H, W]
        receives the video."""
        skipped = []
        for attempt in range(MAX_REPLACEMENT_TRIES):
            i = (index + attempt) % len(self)
            try:
                sample = self.load(i, video_out)
            except BadSample as err:
                skipped.append((err.kind, err.path))
                self.ledger.record(err)
                continue
            self.ledger.ok()
            sample["index"], sample["requested_index"], sample["skipped"] = i, index, skipped
            return sample
        raise TooManyBadSamples(f"{MAX_REPLACEMENT_TRIES} consecutive bad samples from index {index} in "
                                f"{self.json_path}; {self.ledger.summary()}")

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.options.seed, self.epoch, index])

    def plan(self, index: int) -> SamplePlan:
        """The sample's annotation and random choices, without decoding anything."""
        opt, ann = self.options, self.annotation(index)
        sec, rng = opt.section, self.rng(index)
        indices = sample_frame_indices(*ann.face_cut, pixel_frames(opt.num_training_frames), sec.sample_stride, rng)
        source, chosen = ann, select_subjects(ann.subjects, sec.subject_selection, sec.max_subjects_per_sample, rng)
        if opt.is_cross_frame:
            pair = self.cross_frames.pick(ann.key, rng)
            if pair is not None:
                source, chosen = pair
        return SamplePlan(ann, indices, source, chosen)

    def load(self, index: int, video_out: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """One sample, or BadSample. Shapes: video [3, T, H, W] (written into `video_out` if
        given), subject_images [R, 3, Hs, Ws]."""
        opt, plan = self.options, self.plan(index)
        ann, indices = plan.ann, plan.frame_indices
        same_clip = plan.subject_source is ann
        video, extra = load_clip(self._video_of(ann), indices, ann.crop, opt.height, opt.width,
                                 extra_indices=[ann.ann_frame_idx] if same_clip else [], out=video_out)
        subjects, frame = self._subjects(plan, extra.get(ann.ann_frame_idx))
        sample = {
            "video": video, "prompt": ann.caption, "key": ann.key, "frame_indices": torch.from_numpy(indices),
            "subject_images": torch.stack([s["image"] for s in subjects]),
            "subject_class_names": [s["class_name"] for s in subjects],
            "subject_gme_scores": torch.tensor([s["gme_score"] for s in subjects]),
            "subject_aes_scores": torch.tensor([s["aes_score"] for s in subjects]),
            "scores": {k: ann.scores.get(k, float("nan")) for k in ("tech", "motion", "aesthetic")},
        }
        if opt.section.return_foreground:
            sample["foreground_image"] = self._resize_image(frame)
        if opt.section.return_background:
            sample["background_image"] = self._resize_image(self._background(ann))
        return sample

    def _subjects(self, plan: SamplePlan, frame: Optional[np.ndarray]) -> tuple[list[dict], np.ndarray]:
        """Cut the chosen subjects out of the annotated frame (decoded already for the sample's own
        clip; decoded here for a cross-frame partner clip). Returns them and that frame."""
        opt, ann, source, chosen = self.options, plan.ann, plan.subject_source, plan.subjects
        where = f"{source.json_path}[{source.key}]"
        path = self._video_of(source)
        if frame is None:
            frame = read_frames(open_video(path), path, [source.ann_frame_idx])[0]
        out = []
        for subj in chosen:
            field = f"annotation.mask_annotation.{source.ann_frame_idx}.{subj.ann_id}"
            region = frame_for_mask(frame, subj.rle, source.crop, where, field)  # size checked before decoding
            img = cut_out(region, decode_mask(subj.rle, where, field))
            out.append({"image": letterbox(img, *opt.reference_size), "class_name": subj.class_name,
                        "gme_score": subj.gme_score, "aes_score": subj.aes_score})
        return out, crop_box(frame, ann.crop, str(path)) if source is ann else frame

    def _video_of(self, ann: ClipAnnotation) -> Path:
        """The clip's video, its real path inside its part's video directory (or BadSample)."""
        base = self.cross_frames.video_base_for(ann.key) if (self.cross_frames and ann.key not in self.entries) else self.video_base
        return resolve_under(base, ann.video_relpath, f"{ann.json_path}[{ann.key}]", "metadata.path")

    def _resize_image(self, image: np.ndarray) -> torch.Tensor:
        """[h, w, 3] uint8 -> [3, H, W] in [-1, 1], cover-resized like the video."""
        return image_to_model(image, self.options.height, self.options.width)

    def _background(self, ann: ClipAnnotation) -> np.ndarray:
        """`<background_base_path>/<key>.png` with the fallbacks real data needs (OpenS2V #7:
        step 5-2 writes `<key>_step5.png`; keys may carry a `_step6` suffix; some parts name
        files after the video)."""
        if self.background_base is None:
            raise ValueError("opens2v.background_base_paths is required when return_background is on")
        key, base_key = ann.key, ann.key.removesuffix("_step6")
        named_by: dict[str, str] = {}  # file stem -> the JSON field it comes from, in lookup order
        for stem in (key, f"{key}_step5", base_key, f"{base_key}_step5"):
            named_by.setdefault(stem, "clip key")
        named_by.setdefault(Path(ann.video_relpath).stem, "metadata.path")
        for stem, field in named_by.items():
            path = resolve_under(self.background_base, f"{stem}.png", f"{ann.json_path}[{key}]",
                                 f"background named by the {field}")
            if path.is_file():
                return load_rgb_image(path, self.options.section.image_policy)
        raise BadSample("missing-background", str(self.background_base / f"{key}.png"),
                        f"no background image (tried {', '.join(s + '.png' for s in named_by)})")


class MultiPartOpenS2VAdapterDataset(torch.utils.data.ConcatDataset):
    """Several OpenS2V parts in one run: `json_paths`, `video_base_paths` and
    `background_base_paths` are zipped (lists of equal length)."""

    def __init__(self, json_paths: list, video_base_paths: list, background_base_paths: Optional[list] = None,
                 options: Optional[DatasetOptions] = None, cross_frames: Optional[CrossFramePairs] = None,
                 **option_overrides: Any):
        background_base_paths = background_base_paths or [None] * len(json_paths)
        lengths = {"json_paths": len(json_paths), "video_base_paths": len(video_base_paths),
                   "background_base_paths": len(background_base_paths)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"opens2v path lists must have equal lengths, got {lengths}")
        options = options or DatasetOptions.build(**option_overrides)
        parts = [OpenS2VAdapterDataset(j, v, b, options, cross_frames)
                 for j, v, b in zip(json_paths, video_base_paths, background_base_paths)]
        super().__init__(parts)
        self.options = options

    @classmethod
    def from_options(cls, options: DatasetOptions,
                     cross_frames: Optional[CrossFramePairs] = None) -> "MultiPartOpenS2VAdapterDataset":
        """Every part the `opens2v:` section lists."""
        sec = options.section
        return cls(sec.json_paths, sec.video_base_paths, sec.background_base_paths or None, options, cross_frames)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """As OpenS2VAdapterDataset.__getitems__, across parts (all parts share one geometry)."""
        videos = empty_for_transfer((len(indices), *self.datasets[0].video_shape))
        return [part.get(local, video_out=videos[k]) for k, (part, local) in enumerate(map(self.locate, indices))]

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)

    @property
    def ledgers(self) -> list[SkipLedger]:
        return [part.ledger for part in self.datasets]

    def locate(self, index: int) -> tuple[OpenS2VAdapterDataset, int]:
        """The part holding global `index` and the index inside it."""
        part = bisect.bisect_right(self.cumulative_sizes, index)
        return self.datasets[part], index - (self.cumulative_sizes[part - 1] if part else 0)


def collate_opens2v_batch(samples: list[dict[str, Any]]) -> OpenS2VBatch:
    """Stack raw samples; pad subjects to the batch's largest count with white images (value 1.0)."""
    r = max(s["subject_images"].shape[0] for s in samples)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        extra = r - t.shape[0]
        return t if extra == 0 else torch.cat([t, t.new_full((extra, *t.shape[1:]), value)])

    extras = {name: stack_for_transfer([s[name] for s in samples])
              for name in ("foreground_image", "background_image") if name in samples[0]}
    return OpenS2VBatch(
        prompts=[s["prompt"] for s in samples], keys=[s["key"] for s in samples],
        indices=torch.tensor([s["index"] for s in samples]),
        ref_counts=torch.tensor([s["subject_images"].shape[0] for s in samples]),
        video=stack_for_transfer([s["video"] for s in samples]),
        subject_images=torch.stack([pad(s["subject_images"], 1.0) for s in samples]),
        subject_aes_scores=torch.stack([pad(s["subject_aes_scores"], 0.0) for s in samples]),
        subject_gme_scores=torch.stack([pad(s["subject_gme_scores"], 0.0) for s in samples]),
        scores={k: torch.tensor([s["scores"][k] for s in samples]) for k in ("tech", "motion", "aesthetic")},
        extras=extras, skipped=[x for s in samples for x in s["skipped"]])


def create_opens2v_dataloader(dataset: Dataset, batch_size: int = 1, sampler=None, num_workers: int = 2,
                              pin_memory: bool = False, prefetch_factor: int = 2) -> DataLoader:
    """The DataLoader of the subject-reference job, over raw OpenS2V parts or the encoder cache
    (a dataset with its own `collate_fn`, e.g. CachedOpenS2VDataset); batches are OpenS2VBatch.
    Pass a `ResumableDistributedSampler`. Warns when /dev/shm is too small for the batches the
    workers keep in flight."""
    kwargs = dict(prefetch_factor=prefetch_factor, persistent_workers=False) if num_workers > 0 else {}
    options = getattr(dataset, "options", None)
    if num_workers > 0 and options is not None:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        need = (batch_size * options.sample_nbytes, num_workers * ranks_here, prefetch_factor)
        warning = None if need in _WARNED else shared_memory_warning(*need)
        if warning:  # once per setting: the trainer rebuilds its loader every epoch
            _WARNED.add(need)
            log.warning(warning)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=getattr(dataset, "collate_fn", collate_opens2v_batch), pin_memory=pin_memory,
                      drop_last=True, worker_init_fn=_single_threaded_worker, **kwargs)


_WARNED: set[tuple[int, int, int]] = set()


def shared_memory_warning(batch_bytes: int, workers: int, prefetch_factor: int,
                          shm: Path = Path("/dev/shm")) -> Optional[str]:
    """Why the DataLoader may die with a bus error, or None. Workers hand batches over in shared
    memory, `workers * prefetch_factor` of them at a time (count the workers of every rank on the
    node; one 480x832x81 float video is 388 MB), and containers often mount a 64 MiB /dev/shm."""
    if workers == 0 or not shm.is_dir():
        return None
    need, free = batch_bytes * workers * prefetch_factor, shutil.disk_usage(shm).free
    if free >= need:
        return None
    mib = 2 ** 20
    return (f"{shm} has {free / mib:.0f} MiB free, but {workers} workers (all ranks of this node) x "
            f"prefetch_factor {prefetch_factor} x {batch_bytes / mib:.0f} MiB batches need {need / mib:.0f} MiB: the DataLoader may die with a bus "
            f"error. Give the container more shared memory (docker run --shm-size), lower num_workers or "
            f"prefetch_factor, or train from the encoder cache (wanspeed cache).")


def _single_threaded_worker(worker_id: int) -> None:
    """Workers decode in parallel with each other: one torch thread each avoids oversubscription."""
    del worker_id
    torch.set_num_threads(1)
