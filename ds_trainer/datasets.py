"""The run's dataset, built from its config the same way for training and for `wanspeed cache`."""
from __future__ import annotations

from data.cross_frames import CrossFramePairs
from data.opens2v import MultiPartOpenS2VAdapterDataset, OpenS2VSampleOptions
from ds_trainer.config import TrainConfig


def opens2v_dataset(cfg: TrainConfig) -> MultiPartOpenS2VAdapterDataset:
    o = cfg.opens2v
    options = OpenS2VSampleOptions(
        num_training_frames=cfg.num_training_frames, height=cfg.height, width=cfg.width, sample_stride=o.sample_stride,
        max_subjects_per_sample=o.max_subjects_per_sample, subject_selection=o.subject_selection,
        is_cross_frame=cfg.is_cross_frame, seed=cfg.seed)
    pairs = (CrossFramePairs(o.cross_frames_cluster_path, o.cross_frames_base_path,
                             list(zip(o.json_paths, o.video_base_paths))) if cfg.is_cross_frame else None)
    return MultiPartOpenS2VAdapterDataset(o.json_paths, o.video_base_paths, o.background_base_paths or None,
                                          options=options, cross_frames=pairs)
