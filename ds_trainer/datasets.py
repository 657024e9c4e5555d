"""The run's dataset, built from its config the same way for training and for `wanspeed cache`."""
from __future__ import annotations

from data.cross_frames import CrossFramePairs
from data.opens2v import MultiPartOpenS2VAdapterDataset
from data.options import DatasetOptions
from ds_trainer.config import TrainConfig


def opens2v_dataset(cfg: TrainConfig) -> MultiPartOpenS2VAdapterDataset:
    """Every part of `cfg.opens2v`, with the run's geometry, is_cross_frame and seed."""
    o = cfg.opens2v
    options = DatasetOptions(section=o, num_training_frames=cfg.num_training_frames, height=cfg.height,
                             width=cfg.width, is_cross_frame=cfg.is_cross_frame, seed=cfg.seed)
    pairs = (CrossFramePairs(o.cross_frames_cluster_path, o.cross_frames_base_path,
                             list(zip(o.json_paths, o.video_base_paths))) if cfg.is_cross_frame else None)
    return MultiPartOpenS2VAdapterDataset.from_options(options, cross_frames=pairs)
