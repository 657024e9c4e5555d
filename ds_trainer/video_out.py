"""What `wanspeed sample` writes: an H.264 mp4 appended to as frames arrive, and a PNG contact
sheet (the conditioning images beside frames of the video).

Videos are [3, T, H, W] float in [-1, 1]; H and W must be even (yuv420p), which every Wan size is
(multiples of 16).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

SHEET_FRAMES = 6
"""Frames of the video a contact sheet shows (evenly spaced, first and last included)."""


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


class Mp4Writer:
    """An H.264 (libx264) mp4 at `fps`, written block by block: `append(video)` adds frames."""

    def __init__(self, path: Path, fps: int):
        import imageio.v2 as imageio  # noqa: PLC0415

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = imageio.get_writer(str(self.path), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                          pixelformat="yuv420p")
        self.frames = 0
        self.size: Optional[tuple[int, int]] = None

    def append(self, video: torch.Tensor) -> None:
        """video [3, T, H, W] in [-1, 1]; every call must have the same H, W."""
        frames = to_uint8(video)
        if self.size is None:
            if frames.shape[1] % 2 or frames.shape[2] % 2:
                raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {frames.shape[1]}x{frames.shape[2]}")
            self.size = frames.shape[1:3]
        for frame in frames:
            self._writer.append_data(frame)
        self.frames += len(frames)

    def close(self) -> Path:
        self._writer.close()
        return self.path

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()


def contact_sheet(video: torch.Tensor, conditions: Sequence[torch.Tensor], path: Path,
                  frames: int = SHEET_FRAMES) -> Path:
    """A PNG row: each conditioning image ([3, h, w] in [-1, 1]: subject cut-outs, a first frame),
    resized to the video's height, then `frames` evenly spaced frames of `video` [3, T, H, W]."""
    from PIL import Image  # noqa: PLC0415

    t, height = video.shape[1], video.shape[2]
    picks = sorted(set(np.linspace(0, t - 1, min(frames, t)).round().astype(int).tolist()))
    tiles = []
    for image in conditions:
        scale = height / image.shape[1]
        size = (height, max(1, round(image.shape[2] * scale)))
        resized = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear",
                                                  antialias=True, align_corners=False)[0]
        tiles.append(to_uint8(resized[:, None])[0])
    tiles += list(to_uint8(video[:, picks]))
    gap = np.full((height, 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
    path = Path(path)
    Image.fromarray(row).save(path)
    return path
