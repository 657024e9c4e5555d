"""OpenS2V step-5 annotation entries (upstream.md §4.1) parsed into typed records.

Reads the current format (`face_cap_qwen`) and the older variants (`cap: [str]`, keys ending in
`_step6`). A missing or malformed field is a `BadSample('missing-field' | 'bad-field')` naming
the JSON file, the clip key and the dotted field path; `metadata.path` that escapes the video
directory (absolute, or `..`) is rejected.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from data.skips import BadSample


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
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the OpenS2V annotation JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by clip id, got {type(data).__name__}")
    return data


def _get(entry: dict, dotted: str, where: str, kind=None):
    node: Any = entry
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BadSample("missing-field", where, f"missing field '{dotted}'")
        node = node[part]
    if kind is not None and not isinstance(node, kind):
        raise BadSample("bad-field", where, f"field '{dotted}' has type {type(node).__name__}")
    return node


def safe_relpath(rel: str, where: str) -> str:
    """A relative POSIX path that stays under its base directory."""
    p = PurePosixPath(str(rel).replace("\\", "/"))
    if p.is_absolute() or str(rel).startswith(("/", "\\")) or ".." in p.parts or not p.parts:
        raise BadSample("unsafe-path", where, f"metadata.path {rel!r} escapes the video base directory")
    return str(p)


def _caption(meta: dict, where: str) -> str:
    cap = meta.get("face_cap_qwen")
    if isinstance(cap, str) and cap.strip():
        return cap.strip()
    old = meta.get("cap")
    if isinstance(old, list) and old and isinstance(old[0], str) and old[0].strip():
        return old[0].strip()
    raise BadSample("missing-field", where, "no caption: neither 'metadata.face_cap_qwen' nor 'metadata.cap[0]'")


def _range(value, dotted: str, where: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise BadSample("bad-field", where, f"field '{dotted}' must be [start, end], got {value!r}")
    s, e = int(value[0]), int(value[1])
    if not 0 <= s < e:
        raise BadSample("bad-field", where, f"field '{dotted}' = {[s, e]} is empty or negative")
    return s, e


def parse_entry(key: str, entry: dict, json_path: str) -> ClipAnnotation:
    """Validate and type one annotation entry."""
    where = f"{json_path}[{key}]"
    if not isinstance(entry, dict):
        raise BadSample("bad-field", where, "entry is not an object")
    meta = _get(entry, "metadata", where, dict)
    rel = safe_relpath(_get(entry, "metadata.path", where, str), where)
    face_cut = _range(meta.get("face_cut", meta.get("cut")), "metadata.face_cut", where)
    crop = meta.get("crop")
    if crop is not None and not (isinstance(crop, (list, tuple)) and len(crop) == 4):
        raise BadSample("bad-field", where, f"field 'metadata.crop' must be [x0, x1, y0, y1], got {crop!r}")
    frame_data = _get(entry, "annotation.ann_frame_data", where, dict)
    ann_idx = _get(entry, "annotation.ann_frame_data.ann_frame_idx", where)
    try:
        ann_idx = int(ann_idx)
    except (TypeError, ValueError) as exc:
        raise BadSample("bad-field", where, f"field 'annotation.ann_frame_data.ann_frame_idx' = {ann_idx!r}") from exc
    subjects = _subjects(entry, frame_data, ann_idx, where)
    scores = {name: float(meta[name]) for name in ("tech", "motion", "aesthetic") if isinstance(meta.get(name), (int, float))}
    return ClipAnnotation(key=key, json_path=json_path, video_relpath=rel, face_cut=face_cut,
                          crop=tuple(int(v) for v in crop) if crop is not None else None,
                          num_frames=int(meta["num_frames"]) if isinstance(meta.get("num_frames"), (int, float)) else None,
                          caption=_caption(meta, where), ann_frame_idx=ann_idx, subjects=subjects, scores=scores)


def _subjects(entry: dict, frame_data: dict, ann_idx: int, where: str) -> list[SubjectAnnotation]:
    anns = _get(entry, "annotation.ann_frame_data.annotations", where, list)
    masks = _get(entry, "annotation.mask_annotation", where, dict).get(str(ann_idx), {})
    out = []
    for i, ann in enumerate(anns, start=1):
        if not isinstance(ann, dict) or "class_name" not in ann:
            raise BadSample("missing-field", where, f"field 'annotation.ann_frame_data.annotations[{i - 1}].class_name'")
        bbox = ann.get("bbox", (0, 0, 0, 0))
        out.append(SubjectAnnotation(
            ann_id=str(i), class_name=str(ann["class_name"]), bbox=tuple(float(v) for v in bbox),
            gme_score=float(ann.get("gme_score", 0.0)), aes_score=float(ann.get("aes_score", 0.0)),
            rle=masks.get(str(i))))
    usable = [s for s in out if s.rle is not None]
    if not usable:
        raise BadSample("missing-field", where, f"no subject mask in 'annotation.mask_annotation.{ann_idx}'")
    return usable
