"""OpenS2V step-5 annotation entries (upstream.md §4.1) parsed into typed records.

Reads the current format (`face_cap_qwen`) and the older variants (`cap: [str]`, keys ending in
`_step6`). Every field read is checked (type, finiteness, length, range) by the `_number` /
`_numbers` / `_get` helpers: a missing or malformed one is a `BadSample('missing-field' |
'bad-field')` naming the JSON file, the clip key and the dotted field path, never a raw
ValueError / TypeError out of the dataloader. `metadata.path` that escapes the video directory
(absolute, or `..`) is rejected here; symlinks are resolved where the file is opened
(data/paths.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from data.paths import safe_relpath
from data.skips import BadSample

# Frame indices, pixel coordinates and mask sizes above this are no real video's (and would
# overflow the int64 index arrays they become).
MAX_INDEX = 2 ** 31 - 1
SCORE_FIELDS = ("tech", "motion", "aesthetic")


@dataclass
class SubjectAnnotation:
    """One annotated subject: 1-based id (mask_map key), class and scores, and its COCO RLE."""

    ann_id: str
    class_name: str
    bbox: tuple[float, float, float, float]
    gme_score: float
    aes_score: float
    rle: Optional[dict] = None


@dataclass
class ClipAnnotation:
    key: str
    json_path: str
    video_relpath: str
    face_cut: tuple[int, int]
    crop: Optional[tuple[int, int, int, int]]
    num_frames: Optional[int]
    caption: str
    ann_frame_idx: int
    subjects: list[SubjectAnnotation]
    scores: dict[str, float] = field(default_factory=dict)


def load_annotation_file(path: Path) -> dict[str, Any]:
    """The top-level {clip key: entry} dict; an unreadable file is an error naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, and the int-digits limit
        raise ValueError(f"{path}: cannot read the OpenS2V annotation JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by clip id, got {type(data).__name__}")
    return data


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _get(entry: dict, dotted: str, where: str, kind=None):
    node: Any = entry
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BadSample("missing-field", where, f"missing field '{dotted}'")
        node = node[part]
    if kind is not None and not isinstance(node, kind):
        raise BadSample("bad-field", where, f"field '{dotted}' has type {type(node).__name__}")
    return node


def _number(value: Any, dotted: str, where: str, integer: bool = False, minimum: Optional[float] = None):
    """A finite JSON number (an int when `integer`: integral floats such as 3.0 are accepted),
    at least `minimum`; anything else (strings, null, NaN, Infinity, bools) is a BadSample."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, int):
        ok = abs(value) <= MAX_INDEX if integer else abs(value) < 1e300  # huge JSON ints
    elif ok:
        ok = math.isfinite(value) and (not integer or (value.is_integer() and abs(value) <= MAX_INDEX))
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise BadSample("bad-field", where, f"field '{dotted}' must be {what}, got {_show(value)}")
    value = int(value) if integer else float(value)
    if minimum is not None and value < minimum:
        raise BadSample("bad-field", where, f"field '{dotted}' must be >= {minimum}, got {value}")
    return value


def _numbers(value: Any, n: int, dotted: str, where: str, integer: bool = False,
             minimum: Optional[float] = None) -> tuple:
    """A JSON list of exactly `n` numbers, each checked by `_number`."""
    if not isinstance(value, list) or len(value) != n:
        raise BadSample("bad-field", where, f"field '{dotted}' must be a list of {n} numbers, got {_show(value)}")
    return tuple(_number(v, f"{dotted}[{i}]", where, integer, minimum) for i, v in enumerate(value))


def _optional_number(container: dict, name: str, dotted: str, where: str, default=None, integer: bool = False):
    """An optional field: absent gives `default`; present (null included) it must be a number."""
    return _number(container[name], dotted, where, integer) if name in container else default


def _caption(meta: dict, where: str) -> str:
    cap = meta.get("face_cap_qwen")
    if isinstance(cap, str) and cap.strip():
        return cap.strip()
    old = meta.get("cap")
    if isinstance(old, list) and old and isinstance(old[0], str) and old[0].strip():
        return old[0].strip()
    raise BadSample("missing-field", where, "no caption: neither 'metadata.face_cap_qwen' nor 'metadata.cap[0]'")


def _frame_range(meta: dict, where: str) -> tuple[int, int]:
    """`metadata.face_cut` (or the older `cut`) = [start, end) frames, non-empty."""
    name = "face_cut" if "face_cut" in meta else "cut"
    dotted = f"metadata.{name}"
    if name not in meta:
        raise BadSample("missing-field", where, "missing field 'metadata.face_cut' (or 'metadata.cut')")
    start, end = _numbers(meta[name], 2, dotted, where, integer=True, minimum=0)
    if not start < end:
        raise BadSample("bad-field", where, f"field '{dotted}' = {[start, end]} is an empty range")
    return start, end


def _crop(meta: dict, where: str) -> Optional[tuple[int, int, int, int]]:
    """`metadata.crop` = [x0, x1, y0, y1] pixels with x0 < x1 and y0 < y1, or None."""
    if meta.get("crop") is None:
        return None
    x0, x1, y0, y1 = _numbers(meta["crop"], 4, "metadata.crop", where, integer=True, minimum=0)
    if not (x0 < x1 and y0 < y1):
        raise BadSample("bad-field", where, f"field 'metadata.crop' = {[x0, x1, y0, y1]} is empty (x0 < x1, y0 < y1)")
    return x0, x1, y0, y1


def parse_entry(key: str, entry: dict, json_path: str) -> ClipAnnotation:
    """Validate and type one annotation entry."""
    where = f"{json_path}[{key}]"
    if not isinstance(entry, dict):
        raise BadSample("bad-field", where, "entry is not an object")
    meta = _get(entry, "metadata", where, dict)
    rel = safe_relpath(_get(entry, "metadata.path", where, str), where)
    face_cut, crop = _frame_range(meta, where), _crop(meta, where)
    frame_data = _get(entry, "annotation.ann_frame_data", where, dict)
    ann_idx = _number(_get(entry, "annotation.ann_frame_data.ann_frame_idx", where),
                      "annotation.ann_frame_data.ann_frame_idx", where, integer=True, minimum=0)
    scores = {name: _number(meta[name], f"metadata.{name}", where)
              for name in SCORE_FIELDS if name in meta}
    num_frames = _optional_number(meta, "num_frames", "metadata.num_frames", where, integer=True)
    return ClipAnnotation(key=key, json_path=json_path, video_relpath=rel, face_cut=face_cut, crop=crop,
                          num_frames=num_frames, caption=_caption(meta, where), ann_frame_idx=ann_idx,
                          subjects=_subjects(entry, frame_data, ann_idx, where), scores=scores)


def _subjects(entry: dict, frame_data: dict, ann_idx: int, where: str) -> list[SubjectAnnotation]:
    anns = _get(entry, "annotation.ann_frame_data.annotations", where, list)
    masks = _frame_masks(entry, ann_idx, where)
    out = []
    for i, ann in enumerate(anns, start=1):
        dotted = f"annotation.ann_frame_data.annotations[{i - 1}]"
        if not isinstance(ann, dict):
            raise BadSample("bad-field", where, f"field '{dotted}' must be an object, got {_show(ann)}")
        name = ann.get("class_name")
        if not isinstance(name, str):
            kind = "missing-field" if name is None else "bad-field"
            raise BadSample(kind, where, f"field '{dotted}.class_name' must be a string, got {_show(name)}")
        bbox = (0.0, 0.0, 0.0, 0.0) if ann.get("bbox") is None else _numbers(ann["bbox"], 4, f"{dotted}.bbox", where)
        rle = masks.get(str(i))
        if rle is not None:
            _check_rle(rle, f"annotation.mask_annotation.{ann_idx}.{i}", where)
        out.append(SubjectAnnotation(
            ann_id=str(i), class_name=name, bbox=bbox,
            gme_score=_optional_number(ann, "gme_score", f"{dotted}.gme_score", where, 0.0),
            aes_score=_optional_number(ann, "aes_score", f"{dotted}.aes_score", where, 0.0), rle=rle))
    usable = [s for s in out if s.rle is not None]
    if not usable:
        raise BadSample("missing-field", where, f"no subject mask in 'annotation.mask_annotation.{ann_idx}'")
    return usable


def _frame_masks(entry: dict, ann_idx: int, where: str) -> dict:
    """`annotation.mask_annotation.<ann_frame_idx>`: {subject id: RLE}, empty when absent."""
    masks = _get(entry, "annotation.mask_annotation", where, dict).get(str(ann_idx), {})
    if not isinstance(masks, dict):
        raise BadSample("bad-field", where, f"field 'annotation.mask_annotation.{ann_idx}' must be an object "
                                            f"{{subject id: RLE}}, got {type(masks).__name__}")
    return masks


def _check_rle(rle: Any, dotted: str, where: str) -> None:
    """A COCO RLE object: `size` = [H, W] positive ints, `counts` a string or a list of ints.
    Whether the runs are consistent, and the size the frame's, is checked before decoding
    (data/subjects.py)."""
    if not isinstance(rle, dict):
        raise BadSample("bad-field", where,
                        f"field '{dotted}' must be an RLE object {{size, counts}}, got {_show(rle)}")
    _numbers(rle.get("size"), 2, f"{dotted}.size", where, integer=True, minimum=1)
    counts = rle.get("counts")
    if isinstance(counts, list):
        for j, c in enumerate(counts):
            _number(c, f"{dotted}.counts[{j}]", where, integer=True, minimum=0)
    elif not isinstance(counts, str):
        raise BadSample("bad-field", where, f"field '{dotted}.counts' must be a string or a list of run lengths, "
                                            f"got {_show(counts)}")
