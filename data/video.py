"""Video and image decoding: only the frames a sample needs, cropped and resized with torch.

decord's `get_batch` decodes just the requested indices (never the whole clip). Frames are
cropped with OpenS2V's `metadata.crop`, cover-resized and centre-cropped to (height, width), and
scaled to [-1, 1]. No torchvision: it has no CPU build on our package index.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.skips import BadSample
from model.config import VAE_STRIDE


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames for a number of Wan latent frames: 4 (n - 1) + 1 (21 -> 81), the VAE's
    temporal stride (the first frame is encoded on its own)."""
    if latent_frames < 1:
        raise ValueError(f"num_training_frames must be >= 1, got {latent_frames}")
    return VAE_STRIDE[0] * (latent_frames - 1) + 1


def sample_frame_indices(start: int, end: int, num: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """OpenS2V's sampling from the [start, end) range: evenly spaced indices covering at most
    (num - 1) * stride + 1 frames from a random start; a range shorter than `num` frames repeats
    indices (evenly, in order) to reach `num`."""
    length = end - start
    if length <= 0:
        raise ValueError(f"empty frame range [{start}, {end})")
    if length <= num:
        return np.linspace(start, end - 1, num).round().astype(np.int64)
    clip_len = min(length, (num - 1) * stride + 1)
    first = start + int(rng.integers(0, length - clip_len + 1))
    return np.linspace(first, first + clip_len - 1, num).round().astype(np.int64)


def open_video(path: Path):
    """decord VideoReader on CPU (one thread: dataloader workers give the parallelism), or
    BadSample('unreadable-video')."""
    import decord  # noqa: PLC0415  (heavy native import, only where videos are read)

    if not path.is_file():
        raise BadSample("missing-video", str(path), "file not found")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises DECORDError / RuntimeError on broken containers
        raise BadSample("unreadable-video", str(path), str(exc).splitlines()[0][:200]) from exc


def read_frames(reader, path: Path, indices: Sequence[int]) -> np.ndarray:
    """[T, H, W, 3] uint8 for the given indices; a clip too short or truncated is a BadSample."""
    n = len(reader)
    if n == 0 or max(indices) >= n:
        raise BadSample("too-few-frames", str(path), f"needs frame {max(indices)}, video has {n}")
    try:
        frames = reader.get_batch(list(map(int, indices))).asnumpy()
    except Exception as exc:
        raise BadSample("truncated-video", str(path), str(exc).splitlines()[0][:200]) from exc
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(indices):
        raise BadSample("truncated-video", str(path), f"decoded shape {frames.shape}")
    return frames


def crop_box(frames: np.ndarray, crop: Optional[Sequence[int]], path: str) -> np.ndarray:
    """Apply OpenS2V's `metadata.crop` = [x0, x1, y0, y1] to [..., H, W, C] frames."""
    if crop is None:
        return frames
    x0, x1, y0, y1 = (int(v) for v in crop)
    h, w = frames.shape[-3], frames.shape[-2]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise BadSample("bad-crop", path, f"metadata.crop {list(crop)} outside the {w}x{h} frame")
    return frames[..., y0:y1, x0:x1, :]


def resize_cover(frames: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """[T, C, h, w] (uint8 or float) -> [T, C, height, width]: scale to cover, then centre-crop.

    Resize uint8 frames before converting them to float: torch's uint8 antialiased path is ~4x
    faster on CPU than the float one (measured on 81 frames of 294x510) and within one level."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode=mode, antialias=mode in ("bilinear", "bicubic"),
                               align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[..., top:top + height, left:left + width]


def empty_for_transfer(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it is allocated in shared memory, so
    handing it to the main process copies nothing (torch's default_collate does the same for the
    batches it stacks). A 480x832x81 float video is 388 MB: each avoided copy is ~0.1 s."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def to_unit_range(frames_uint8: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 [..] -> float32 [..] in [-1, 1] (x / 127.5 - 1: 0 -> -1 and 255 -> 1 exactly), in
    the input's logical layout, contiguous, written into `out` if given (e.g. a row of a batch
    buffer). Give it contiguous frames: a strided uint8 -> float copy is ~3x slower on CPU than a
    layout change on the uint8 values followed by this."""
    src = frames_uint8.contiguous()
    if out is None:
        out = empty_for_transfer(src.shape)
    elif out.shape != src.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {tuple(src.shape)} tensor, got "
                         f"{out.dtype} {tuple(out.shape)}")
    out.copy_(src)
    return out.div_(127.5).sub_(1.0)


def video_to_model(frames_uint8: np.ndarray, height: int, width: int,
                   rows: Optional[Sequence[int]] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoded frames [N, h, w, 3] uint8 -> video [3, T, height, width] float32 in [-1, 1].

    `rows` picks (and may repeat) the frames to keep, after the resize: resizing one unused frame
    is cheaper than copying the full-size ones to drop it. Nothing full-size is copied: the
    frames are read in place (channels-last) and resized in uint8; the pick and the transpose to
    [3, T] are one pass over the small uint8 frames, then the float conversion runs once (into
    `out` if given)."""
    if not frames_uint8.flags.writeable:  # torch.from_numpy warns on read-only arrays
        frames_uint8 = frames_uint8.copy()
    x = resize_cover(torch.from_numpy(frames_uint8).permute(0, 3, 1, 2), height, width)
    rows = range(x.shape[0]) if rows is None else rows
    planar = torch.empty((3, len(rows), height, width), dtype=torch.uint8)
    for t, row in enumerate(rows):
        planar[:, t].copy_(x[int(row)])
    return to_unit_range(planar, out)


def image_to_model(image_uint8: np.ndarray, height: int, width: int) -> torch.Tensor:
    """[h, w, 3] uint8 -> [3, height, width] float32 in [-1, 1], cover-resized like the video."""
    return video_to_model(image_uint8[None], height, width)[:, 0]


def load_clip(path: Path, indices: Sequence[int], crop, height: int, width: int,
              extra_indices: Sequence[int] = (), out: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
    """Decode the sampled frames (plus `extra_indices`, e.g. the annotated frame) in ONE
    `get_batch` pass, then crop and cover-resize the sampled ones.

    Returns the video [3, T, height, width] in [-1, 1] (written into `out` if given) and
    {extra index: [H, W, 3] uint8 full frame}.
    """
    lo, hi = int(min(indices)), int(max(indices))
    inside = [int(i) for i in extra_indices if lo <= i <= hi]  # free: decoded on the way anyway
    outside = [int(i) for i in extra_indices if not lo <= i <= hi]
    reader = open_video(path)
    need = np.union1d(np.asarray(indices), np.asarray(inside, dtype=np.int64))
    frames = read_frames(reader, path, need)
    row = {int(i): k for k, i in enumerate(need)}
    video = video_to_model(crop_box(frames, crop, str(path)), height, width, rows=[row[int(i)] for i in indices],
                           out=out)
    extra = {i: frames[row[i]] for i in inside}
    if outside:  # a separate seek: decoding from the span's start back to it would cost more
        extra.update(zip(outside, read_frames(reader, path, outside)))
    return video, extra


def load_rgb_image(path: Path, policy: str = "convert") -> np.ndarray:
    """An image as [H, W, 3] uint8 RGB.

    Grayscale, 16-bit and RGBA images are converted (alpha composited on white, 16-bit scaled to
    8-bit) under policy 'convert', or rejected as BadSample under policy 'skip'.
    """
    if not path.is_file():
        raise BadSample("missing-image", str(path), "file not found")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode != "RGB" and policy == "skip":
                raise BadSample(f"image-mode-{mode}", str(path), f"mode {mode}, RGB expected")
            return _to_rgb(img)
    except BadSample:
        raise
    except Exception as exc:
        raise BadSample("unreadable-image", str(path), str(exc)[:200]) from exc


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))
