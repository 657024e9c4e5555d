"""What an OpenS2V dataset reads and how it draws samples.

`OpenS2VSection` IS the run config's `opens2v:` section (ds_trainer/config.py imports it): the
data parts and the sampling options, each value checked when the config is loaded. The frame
geometry, `is_cross_frame` and `seed` are top-level keys of a run config (the seed YAML has them
there); `DatasetOptions` holds the section together with those, as a dataset needs them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from data.subjects import SUBJECT_SELECTIONS
from data.video import pixel_frames
from model.config import ConfigError

IMAGE_POLICIES = ("convert", "skip")


@dataclass
class OpenS2VSection:
    """`opens2v:` data paths (one entry per dataset part, zipped) and how samples are drawn."""

    json_paths: list[str] = field(default_factory=list)
    """Annotation JSON of each part (OpenS2V step 5 `merge_final_json`)."""
    video_base_paths: list[str] = field(default_factory=list)
    """Video directory of each part (the annotations' `metadata.path` are relative to it)."""
    background_base_paths: list[str] = field(default_factory=list)
    """Inpainted-background directory of each part; empty = none (needed by return_background)."""
    sample_stride: int = 3
    """Pixel-frame stride inside `face_cut` (the OpenS2V loader's default)."""
    max_subjects_per_sample: int = 1
    """Subject images per sample, at most (a clip may annotate fewer)."""
    subject_selection: str = "first"
    """'first', 'random' or 'best_score' (highest aesthetic score)."""
    cross_frames_cluster_path: Optional[str] = None
    """step6 `cluster_videos.json` (only with `is_cross_frame`)."""
    cross_frames_base_path: Optional[str] = None
    """step6 `cross-frames-pairs/final_output` directory (only with `is_cross_frame`)."""
    subject_size: Optional[tuple[int, int]] = None
    """(height, width) of the subject images; None = the video size (one VAE token per latent
    position of a full frame, as the reference path expects)."""
    return_foreground: bool = False
    """Also return the full annotated frame (cover-resized)."""
    return_background: bool = False
    """Also return the inpainted background image; a missing one then skips the sample."""
    image_policy: str = "convert"
    """RGBA / grayscale / 16-bit images: 'convert' (alpha on white, to 8-bit RGB) or 'skip'."""
    max_bad_fraction: float = 0.2
    """Stop with an error naming the worst file once more than this share of samples is bad."""

    def __post_init__(self):
        if len(self.video_base_paths) != len(self.json_paths):
            raise ConfigError(f"must have one entry per json_paths entry ({len(self.json_paths)}), "
                              f"got {len(self.video_base_paths)}", key="video_base_paths")
        if self.background_base_paths and len(self.background_base_paths) != len(self.json_paths):
            raise ConfigError(f"must have one entry per json_paths entry ({len(self.json_paths)}), "
                              f"got {len(self.background_base_paths)}", key="background_base_paths")
        if self.subject_selection not in SUBJECT_SELECTIONS:
            raise ConfigError(f"must be one of {SUBJECT_SELECTIONS}, got {self.subject_selection!r}",
                              key="subject_selection")
        for name in ("max_subjects_per_sample", "sample_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=name)
        if self.image_policy not in IMAGE_POLICIES:
            raise ConfigError(f"must be one of {IMAGE_POLICIES}, got {self.image_policy!r}", key="image_policy")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {self.max_bad_fraction}", key="max_bad_fraction")
        if self.subject_size is not None and min(self.subject_size) < 1:
            raise ConfigError(f"must be positive (height, width), got {self.subject_size}", key="subject_size")
        if self.return_background and self.json_paths and not self.background_base_paths:
            raise ConfigError("return_background is on but no background_base_paths are given",
                              key="background_base_paths")


@dataclass(frozen=True)
class DatasetOptions:
    """The `opens2v:` section plus the run-level keys a dataset needs."""

    section: OpenS2VSection = field(default_factory=OpenS2VSection)
    num_training_frames: int = 21
    """Latent frames; pixel frames = 4 (n - 1) + 1 (21 -> 81)."""
    height: int = 480
    width: int = 832
    is_cross_frame: bool = False
    """Take the subject from another clip of the same source video (step-6 pairs)."""
    seed: int = 0
    """Seeds the per-sample random choices (with the epoch and the index)."""

    def __post_init__(self):
        pixel_frames(self.num_training_frames)  # validates

    @classmethod
    def build(cls, **kwargs: Any) -> "DatasetOptions":
        """From flat keyword options: this class's fields, the rest are `OpenS2VSection` fields."""
        own = {f.name for f in dataclasses.fields(cls)} - {"section"}
        section = OpenS2VSection(**{k: v for k, v in kwargs.items() if k not in own})
        return cls(section=section, **{k: v for k, v in kwargs.items() if k in own})

    @property
    def reference_size(self) -> tuple[int, int]:
        size = self.section.subject_size
        return tuple(size) if size else (self.height, self.width)

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one sample's float32 video (what dominates a batch in shared memory)."""
        return 3 * pixel_frames(self.num_training_frames) * self.height * self.width * 4
