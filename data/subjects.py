"""Subject reference images from OpenS2V masks: decode the COCO RLE, paste the masked pixels on
white, crop to the mask's box, then letterbox (on white) to the reference size the CLIP and VAE
encoders take."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data.annotations import SubjectAnnotation
from data.skips import BadSample

SUBJECT_SELECTIONS = ("first", "random", "best_score")
WHITE = 255


def decode_mask(rle: dict, where: str, field: str = "rle") -> np.ndarray:
    """COCO RLE ({'size': [H, W], 'counts': str}) -> [H, W] bool; corrupt RLE is a BadSample.
    Check the declared size first (`frame_for_mask`): a few bytes can declare a huge mask."""
    from pycocotools import mask as mask_utils  # noqa: PLC0415

    try:
        size = [int(v) for v in rle["size"]]
        counts = rle["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            runs = [int(c) for c in counts]
            counts = mask_utils.frPyObjects({"size": size, "counts": runs}, *size)["counts"]
        else:
            counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            runs = rle_runs(counts)
        if min(runs, default=-1) < 0 or sum(runs) != size[0] * size[1]:
            raise ValueError(f"runs sum to {sum(runs)} for a {size[0]}x{size[1]} mask")
        m = mask_utils.decode({"size": size, "counts": counts})
    except Exception as exc:  # pycocotools raises TypeError/ValueError/KeyError on junk
        raise BadSample("corrupt-rle", where, f"field '{field}': cannot decode the RLE mask: {exc}") from exc
    if m.shape[:2] != tuple(size) or m.sum() == 0:
        raise BadSample("corrupt-rle", where, f"field '{field}': RLE decodes to an empty or mis-sized mask {m.shape}")
    return m.astype(bool)


def rle_runs(counts: bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools' `rleFrString`), to validate it:
    pycocotools itself decodes many corrupt strings into garbage masks without complaint."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("RLE string ends inside a run length")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid RLE character {chr(counts[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def cut_out(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked pixels on white, cropped to the mask's bounding box: [h, w, 3] uint8."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    out = np.full_like(frame[y0:y1, x0:x1], WHITE)
    m = mask[y0:y1, x0:x1]
    out[m] = frame[y0:y1, x0:x1][m]
    return out


def letterbox(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """[h, w, 3] uint8 -> [3, height, width] in [-1, 1], aspect kept, padded with white."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    scale = min(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    canvas = torch.full((3, height, width), float(WHITE))
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = x
    return canvas.clamp_(0, 255).div_(127.5).sub_(1.0)


def select_subjects(subjects: list[SubjectAnnotation], how: str, k: int, rng: np.random.Generator) -> list[SubjectAnnotation]:
    """Pick up to k subjects: 'first' (annotation order), 'random', 'best_score' (aesthetic)."""
    if how == "first":
        return subjects[:k]
    if how == "random":
        order = rng.permutation(len(subjects))[:k]
        return [subjects[i] for i in order]
    if how == "best_score":
        return sorted(subjects, key=lambda s: -s.aes_score)[:k]
    raise ValueError(f"subject_selection must be one of {SUBJECT_SELECTIONS}, got {how!r}")


def frame_for_mask(frame: np.ndarray, rle: dict, crop, where: str, field: str = "rle") -> np.ndarray:
    """The frame in the mask's coordinates, chosen from the RLE's declared `size` BEFORE it is
    decoded (7 bytes of RLE can declare a 20000 x 20000 mask): the full frame, or the
    `metadata.crop` region when the mask was drawn on the cropped frame; any other size is a
    BadSample naming the field."""
    try:
        size = tuple(int(v) for v in rle["size"])
    except (TypeError, ValueError, KeyError) as exc:
        raise BadSample("corrupt-rle", where, f"field '{field}.size' is not [H, W]: {exc}") from exc
    if size == frame.shape[:2]:
        return frame
    if crop is not None:
        x0, x1, y0, y1 = crop
        region = frame[y0:y1, x0:x1]
        if region.shape[:2] == size:  # a crop past the frame's edge slices short: no match
            return region
    raise BadSample("mask-size-mismatch", where,
                    f"field '{field}.size' = {list(size)} fits neither the frame {frame.shape[:2]} nor its crop")
