"""A small synthetic dataset in the exact OpenS2V on-disk layout (`wanspeed make-demo-data`).

Every clip is a real mp4 of textured, saturated shapes moving over a muted textured background,
with the step-5 annotation an OpenS2V loader reads (caption, word tags, xyxy boxes, COCO RLE
masks), the subject-free background PNG, and step-6 cross-frame pairs between clips of one
source video. Everything is drawn, so the masks are exact: the RLE of a subject is the set of
pixels painted with its texture at `ann_frame_idx`, and the PNG is the frame without subjects.

Layout under `out` (K parts `demo_part1..K`, clips spread over them in order):

    step0/videos/<part>/<video_id>/<video_id>_part<k>.mp4        metadata.path is relative to
                                                                 step0/videos/<part>
    step5/merge_final_json/<part>.json                           {clip key: entry}
    step5/final_output/<part>/foreground/<clip key>.png          the background (upstream's
                                                                 "foreground" folder holds them)
    step6/cluster_videos.json                                    {video_id: ["<part>/<key>", ...]}
    step6/cross-frames-pairs/final_output/<video_id>.json        [{cur_id, aft_id, ...}, ...]

Conventions, as upstream (reference/upstream.md §4):
- clip key `<video_id>_part<k>_step1-<a>-<b>_step2-<a>-<b>_step3_step4_step5`, where step1 is
  `cut` and step2 is `face_cut`; the file stem `<video_id>_part<k>` differs from the key, as in
  real data (OpenS2V issue #7), so a loader must look backgrounds up by key, videos by path.
- ranges `[start, end)` count frames of the mp4; `crop` is `[x0, x1, y0, y1]`.
- masks, boxes, `img_width` / `img_height` are in full-frame pixels (not the crop); a box is the
  mask's pixel-edge extent `[x0, y0, x1 + 1, y1 + 1]`.
- older clips (`old_variants`) carry `cap: [str]` and no `face_cap_qwen`; every second one also
  ends its key in `_step6`.
- step-6 ids are `"<part>/<key>"` (what the demo loader compares); all clips of one source video
  live in one part, because that loader looks the other clip up in the current part's JSON.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

PART_PREFIX = "demo_part"
KEY_STEPS = "_step3_step4_step5"
OLD_KEY_SUFFIX = "_step6"
# Clips per source video, cycled: singletons and clusters of 2 and 3 for the step-6 pairs.
CLIPS_PER_SOURCE = (2, 1, 3)
# Every OLD_EVERY-th clip (1-based) is written in the older annotation variant.
OLD_EVERY = 4
# Subjects stay inside the frame minus this fraction on each side, so a crop never cuts them.
MARGIN = 1 / 8
# A subject's half width / height as a fraction of its region's smaller side (1.5 x the other side):
# large, like OpenS2V's subjects (people filling much of the frame), so that what a clip shows
# depends on its subjects more than on its background.
SUBJECT_HALF = (0.3, 0.45)
# Background grey level range and the contrast of its diagonal gradient (uint8 levels).
BACKGROUND_GREY = (110, 140)
BACKGROUND_RAMP = 50
# Texture contrast around a subject's base colour (uint8 levels): the shades average to it.
SHADE = 28
X264_CRF = "12"  # near-lossless: the tests compare decoded pixels with the drawn ones
MIN_SIDE = 32
# Random streams per source, so a clip's draws do not depend on the others. Non-zero tags: numpy's
# SeedSequence gives (a, b) and (a, b, 0) the same stream.
SOURCE_STREAM, CLIP_STREAM, PAIRS_STREAM = 1, 2, 3

# Saturated subject colours (every channel within SHADE of 0..255, so shades never clip).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 36, 36), "green": (36, 190, 60), "blue": (40, 70, 220),
    "yellow": (226, 200, 30), "magenta": (210, 40, 200), "cyan": (30, 190, 210),
    "orange": (226, 120, 30),
}
# Muted background tints added to a grey level.
TINTS: dict[str, tuple[int, int, int]] = {
    "blue-grey": (-10, 0, 16), "warm grey": (16, 6, -10), "olive grey": (6, 12, -12),
    "lavender grey": (10, -6, 16),
}
PATTERNS = ("faint diagonal stripes", "a faint grid", "soft ripples")
# shape -> (texture word, area / bbox area): the tests check masks against the fill ratio.
SHAPES: dict[str, tuple[str, float]] = {
    "ellipse": ("striped", math.pi / 4), "rectangle": ("checkered", 1.0), "diamond": ("ringed", 0.5),
}
MOTIONS: dict[str, str] = {
    "left_to_right": "glides from left to right", "right_to_left": "glides from right to left",
    "top_to_bottom": "sinks from the top to the bottom", "bottom_to_top": "rises from the bottom to the top",
    "clockwise": "circles clockwise", "counterclockwise": "circles counterclockwise",
}


@dataclass(frozen=True)
class DemoDataset:
    """What `make_demo_dataset` wrote: one entry per part in each list, as the trainer config wants."""

    root: Path
    parts: list[str]
    json_paths: list[Path]
    video_base_paths: list[Path]
    background_base_paths: list[Path]
    keys: list[list[str]]
    """Clip keys per part, in JSON order."""
    cluster_path: Optional[Path] = None
    """step6/cluster_videos.json, or None without cross-frame pairs."""
    cross_frames_base_path: Optional[Path] = None
    """step6/cross-frames-pairs/final_output (one `<cluster_id>.json` per cluster), or None."""

    def config_snippet(self) -> str:
        """The `opens2v:` block to paste into a training YAML."""
        lines = ["opens2v:"]
        for name in ("json_paths", "video_base_paths", "background_base_paths"):
            lines.append(f"  {name}:")
            lines += [f'    - "{p}"' for p in getattr(self, name)]
        if self.cluster_path is not None:
            lines.append(f'# step 6 cross-frame pairs: cluster "{self.cluster_path}", '
                         f'pairs "{self.cross_frames_base_path}"')
        return "\n".join(lines)


@dataclass(frozen=True)
class _Subject:
    shape: str
    colour: str
    half: tuple[float, float]
    """Half width, half height in pixels."""
    period: float
    """Texture period in pixels."""
    region: tuple[float, float, float, float]
    """x0, x1, y0, y1 the whole shape stays inside (disjoint between subjects)."""

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def description(self) -> str:
        return f"{self.colour} {SHAPES[self.shape][0]} {self.shape}"


@dataclass(frozen=True)
class _Source:
    """One source video: a background and the subjects every clip of it shows."""

    index: int
    """Global source number: seeds its draws and those of its clips."""
    video_id: str
    background: np.ndarray  # [H, W, 3] uint8
    tint: str
    pattern: str
    subjects: list[_Subject]


@dataclass
class _Clip:
    part: str
    source: _Source
    index: int
    """k in `_part<k>`, 1-based within the source."""
    old: Optional[str]
    """None, "cap" (cap list, no face_cap_qwen) or "step6" (that and a `_step6` key)."""
    key: str = ""
    entry: dict = field(default_factory=dict)


def make_demo_dataset(out: Path, clips: int, parts: int = 1, height: int = 96, width: int = 160,
                      frames: int = 49, fps: float = 16, seed: int = 0,
                      old_variants: Optional[bool] = None, cross_frames: bool = True) -> DemoDataset:
    """Write `clips` clips in `parts` parts under `out`; deterministic in `seed`.

    `old_variants`: write every 4th clip in the older annotation variant; None means "when
    clips >= 4". `cross_frames`: write step 6 (cluster file and cross-frame pairs). Files are
    overwritten in place; those of an earlier run with other settings are left as they were.
    """
    _validate(clips, parts, height, width, frames, fps, seed)
    old_variants = clips >= OLD_EVERY if old_variants is None else old_variants
    out = Path(out).resolve()
    plan = _plan(clips, parts, height, width, seed, old_variants)
    for clip in plan:
        _write_clip(out, clip, height, width, frames, fps, seed)
    names = [f"{PART_PREFIX}{p + 1}" for p in range(parts)]
    keys = [[c.key for c in plan if c.part == name] for name in names]
    json_dir = out / "step5" / "merge_final_json"
    json_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        entries = {c.key: c.entry for c in plan if c.part == name}
        (json_dir / f"{name}.json").write_text(json.dumps(entries, indent=2))
    cluster_path = pairs_dir = None
    if cross_frames:
        cluster_path, pairs_dir = _write_step6(out / "step6", plan, seed)
    dataset = DemoDataset(
        root=out, parts=names, json_paths=[json_dir / f"{n}.json" for n in names],
        video_base_paths=[out / "step0" / "videos" / n for n in names],
        background_base_paths=[out / "step5" / "final_output" / n / "foreground" for n in names],
        keys=keys, cluster_path=cluster_path, cross_frames_base_path=pairs_dir)
    log.info("wrote %d clips in %d parts under %s", clips, parts, out)
    return dataset


def _validate(clips, parts, height, width, frames, fps, seed) -> None:
    if clips < 1 or not 1 <= parts <= clips:
        raise ValueError(f"need clips >= 1 and 1 <= parts <= clips, got clips={clips}, parts={parts}")
    if height % 2 or width % 2 or min(height, width) < MIN_SIDE:
        raise ValueError(f"height and width must be even (yuv420p) and >= {MIN_SIDE}, got {height}x{width}")
    if frames < 1 or fps <= 0:
        raise ValueError(f"need frames >= 1 and fps > 0, got frames={frames}, fps={fps}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _plan(clips: int, parts: int, height: int, width: int, seed: int, old_variants: bool) -> list[_Clip]:
    """Parts get contiguous, balanced runs of clips; within a part, clips group into sources."""
    plan: list[_Clip] = []
    n_sources = 0
    for p in range(parts):
        remaining = (p + 1) * clips // parts - p * clips // parts
        while remaining:
            size = min(CLIPS_PER_SOURCE[n_sources % len(CLIPS_PER_SOURCE)], remaining)
            source = _make_source(np.random.default_rng((seed, n_sources, SOURCE_STREAM)), n_sources,
                                  f"synth-{seed}-{n_sources:04d}", height, width)
            for k in range(1, size + 1):
                plan.append(_Clip(part=f"{PART_PREFIX}{p + 1}", source=source, index=k, old=None))
            n_sources += 1
            remaining -= size
    if old_variants:
        old = [i for i in range(clips) if i % OLD_EVERY == OLD_EVERY - 1] or [clips - 1]
        for j, i in enumerate(old):
            plan[i].old = "cap" if j % 2 == 0 else "step6"
    return plan


def _make_source(rng: np.random.Generator, index: int, video_id: str, height: int, width: int) -> _Source:
    tint = str(rng.choice(list(TINTS)))
    pattern = str(rng.choice(PATTERNS))
    background = _background(rng, height, width, TINTS[tint], pattern)
    n = int(rng.integers(1, 3))
    mx, my = math.ceil(width * MARGIN), math.ceil(height * MARGIN)
    if n == 1:
        regions = [(mx, width - mx, my, height - my)]
    else:  # left and right halves with a 2-pixel gap: the subjects never touch
        regions = [(mx, width / 2 - 1, my, height - my), (width / 2 + 1, width - mx, my, height - my)]
    colours = rng.choice(list(PALETTE), size=n, replace=False)
    shapes = rng.choice(list(SHAPES), size=n, replace=False)
    subjects = []
    for region, colour, shape in zip(regions, colours, shapes):
        rw, rh = region[1] - region[0], region[3] - region[2]
        half = (rng.uniform(*SUBJECT_HALF) * min(rw, 1.5 * rh), rng.uniform(*SUBJECT_HALF) * min(rh, 1.5 * rw))
        subjects.append(_Subject(shape=str(shape), colour=str(colour), half=half,
                                 period=max(2.0, round(min(half) / 3)), region=region))
    return _Source(index, video_id, background, tint, pattern, subjects)


def _background(rng: np.random.Generator, height: int, width: int, tint: tuple[int, int, int],
                pattern: str) -> np.ndarray:
    """A diagonal grey gradient in `tint` with a low-contrast pattern: [H, W, 3] uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx / width - 0.5) * math.cos(angle) + (yy / height - 0.5) * math.sin(angle)  # [-0.7, 0.7]
    grey = rng.uniform(*BACKGROUND_GREY) + BACKGROUND_RAMP * ramp
    wavelength = rng.uniform(6, 12)
    if pattern == "faint diagonal stripes":
        texture = np.sin(2 * math.pi * (xx + yy) / wavelength)
    elif pattern == "a faint grid":
        texture = -((xx % wavelength < 1.5) | (yy % wavelength < 1.5)).astype(np.float64)
    else:
        texture = np.sin(2 * math.pi * xx / wavelength) * np.sin(2 * math.pi * yy / (1.3 * wavelength))
    image = grey[..., None] + np.asarray(tint, np.float64) + 14 * texture[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _motion(rng: np.random.Generator, subject: _Subject, frames: int) -> tuple[np.ndarray, str]:
    """Centres [F, 2] (x, y) along a smooth path that keeps the shape in its region, and its name."""
    (x0, x1, y0, y1), (hx, hy) = subject.region, subject.half
    lo, hi = np.array([x0 + hx, y0 + hy]), np.array([x1 - hx, y1 - hy])
    mid, span = (lo + hi) / 2, hi - lo
    tau = np.arange(frames) / max(frames - 1, 1)
    motion = str(rng.choice(list(MOTIONS)))
    if motion in ("clockwise", "counterclockwise"):
        # image y points down, so an increasing angle turns clockwise on screen
        theta = rng.uniform(0, 2 * math.pi) + (1 if motion == "clockwise" else -1) * 2 * math.pi * tau
        centres = mid + span / 2 * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    else:
        axis = 0 if motion in ("left_to_right", "right_to_left") else 1
        ease = (1 - np.cos(math.pi * tau)) / 2
        if motion in ("right_to_left", "bottom_to_top"):
            ease = 1 - ease
        centres = np.empty((frames, 2))
        centres[:, axis] = lo[axis] + span[axis] * ease
        centres[:, 1 - axis] = lo[1 - axis] + span[1 - axis] * rng.uniform(0.2, 0.8)
    return centres, motion


def _draw(subject: _Subject, centre: np.ndarray, yy: np.ndarray, xx: np.ndarray):
    """The subject's pixels at `centre`: (mask [H, W] bool, colour [H, W, 3] float)."""
    dx, dy = xx + 0.5 - centre[0], yy + 0.5 - centre[1]  # pixel centres
    hx, hy = subject.half
    if subject.shape == "ellipse":
        mask = (dx / hx) ** 2 + (dy / hy) ** 2 <= 1
        band = np.floor((dx + 0.5 * dy) / subject.period)
    elif subject.shape == "rectangle":
        mask = (np.abs(dx) <= hx) & (np.abs(dy) <= hy)
        band = np.floor(dx / subject.period) + np.floor(dy / subject.period)
    else:
        mask = np.abs(dx) / hx + np.abs(dy) / hy <= 1
        band = np.floor(np.hypot(dx, dy) / subject.period)
    shade = np.where(band % 2 == 0, SHADE, -SHADE)
    return mask, np.asarray(PALETTE[subject.colour], np.float64) + shade[..., None]


def _render(source: _Source, paths: list[np.ndarray], mask_frame: int):
    """Frames [F, H, W, 3] uint8 and each subject's visible mask [H, W] bool at `mask_frame`."""
    height, width = source.background.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    video = np.repeat(source.background[None], len(paths[0]), axis=0)
    masks: list[np.ndarray] = []
    for t in range(len(video)):
        drawn = [_draw(s, path[t], yy, xx) for s, path in zip(source.subjects, paths)]
        for mask, colour in drawn:  # later subjects on top
            video[t][mask] = np.rint(colour[mask]).astype(np.uint8)
        if t == mask_frame:  # visible part: minus whatever was drawn later
            covered = np.zeros((height, width), dtype=bool)
            for mask, _ in reversed(drawn):
                masks.insert(0, mask & ~covered)
                covered |= mask
    return video, masks


def _write_mp4(path: Path, video: np.ndarray, fps: float) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1, quality=None,
                                ffmpeg_log_level="error", output_params=["-crf", X264_CRF, "-preset", "veryfast"])
    try:
        for frame in video:
            writer.append_data(frame)
    finally:
        writer.close()


def _rle(mask: np.ndarray) -> str:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def _write_clip(out: Path, clip: _Clip, height: int, width: int, frames: int, fps: float, seed: int) -> None:
    """Render, encode and annotate one clip; fills `clip.key` and `clip.entry`."""
    from PIL import Image

    rng = np.random.default_rng((seed, clip.source.index, CLIP_STREAM, clip.index))
    cut = [0, frames]
    face_cut = cut
    if frames >= 8 and rng.random() < 0.4:  # a shorter range the loader samples from
        face_cut = [int(rng.integers(1, frames // 8 + 1)), frames - int(rng.integers(1, frames // 8 + 1))]
    ann_idx = int(rng.integers(face_cut[0], face_cut[1]))
    crop = [0, width, 0, height]
    if rng.random() < 0.5:  # trims stay inside the margin the subjects never enter
        tx, ty = int(width * MARGIN) // 2, int(height * MARGIN) // 2
        crop = [2 * int(rng.integers(1, tx + 1)), width - 2 * int(rng.integers(1, tx + 1)),
                2 * int(rng.integers(1, ty + 1)), height - 2 * int(rng.integers(1, ty + 1))]
    motions = [_motion(rng, s, frames) for s in clip.source.subjects]
    paths = [m[0] for m in motions]
    video, masks = _render(clip.source, paths, ann_idx)

    vid, stem = clip.source.video_id, f"{clip.source.video_id}_part{clip.index}"
    clip.key = (f"{stem}_step1-{cut[0]}-{cut[1]}_step2-{face_cut[0]}-{face_cut[1]}{KEY_STEPS}"
                + (OLD_KEY_SUFFIX if clip.old == "step6" else ""))
    rel_path = f"{vid}/{stem}.mp4"
    _write_mp4(out / "step0" / "videos" / clip.part / rel_path, video, fps)
    bg_dir = out / "step5" / "final_output" / clip.part / "foreground"
    bg_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(clip.source.background).save(bg_dir / f"{clip.key}.png")

    speed = np.mean([np.linalg.norm(np.diff(p, axis=0), axis=1).mean() if frames > 1 else 0.0 for p in paths])
    metadata = {
        "path": rel_path, "cut": cut, "face_cut": face_cut, "crop": crop, "fps": float(fps),
        "num_frames": frames, "resolution": {"height": height, "width": width},
        "tech": _r(rng.uniform(1.5, 3.0)), "motion": _r(speed / width, 6), "aesthetic": _r(rng.uniform(4.5, 6.0)),
    }
    caption = _caption(clip.source, [m[1] for m in motions])
    if clip.old:
        metadata["cap"] = [caption]
    else:
        metadata["face_cap_qwen"] = caption
    clip.entry = {"metadata": metadata, "word_tags": _word_tags(clip.source),
                  "annotation": _annotation(rng, clip.source.subjects, masks, ann_idx, height, width)}


def _r(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


def _a(noun_phrase: str) -> str:
    return f"{'an' if noun_phrase[0] in 'aeiou' else 'a'} {noun_phrase}"


def _caption(source: _Source, motions: list[str]) -> str:
    action = " while ".join(f"{_a(s.description)} {MOTIONS[m]}" for s, m in zip(source.subjects, motions))
    return (f"{action[0].upper()}{action[1:]}. The background is {_a(source.tint)} gradient with "
            f"{source.pattern}. The camera is static.")


def _word_tags(source: _Source) -> dict:
    return {"background": [f"{source.tint} gradient", source.pattern.removeprefix("a ")],
            "subject": [s.class_name for s in source.subjects],
            "object": [f"{SHAPES[s.shape][0]} pattern" for s in source.subjects],
            "pre_define": sorted({s.shape for s in source.subjects})}


def _annotation(rng: np.random.Generator, subjects: list[_Subject], masks: list[np.ndarray],
                ann_idx: int, height: int, width: int) -> dict:
    annotations, rles = [], {}
    for i, (subject, mask) in enumerate(zip(subjects, masks), start=1):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
        annotations.append({"class_name": subject.class_name, "bbox": bbox,
                            "gme_score": _r(rng.uniform(0.3, 0.5)), "aes_score": _r(rng.uniform(4.0, 5.5))})
        rles[str(i)] = {"size": [height, width], "counts": _rle(mask), "score": [_r(rng.uniform(0.9, 0.99))]}
    return {
        "ann_frame_data": {
            "ann_frame_idx": ann_idx, "box_format": "xyxy", "img_width": width, "img_height": height,
            "foreground_ase_score": _r(rng.uniform(4.0, 5.5)), "background_ase_score": _r(rng.uniform(4.0, 5.5)),
            "annotations": annotations},
        "mask_map": {str(i): {"class_name": s.class_name} for i, s in enumerate(subjects, start=1)},
        "mask_annotation": {str(ann_idx): rles},
    }


def _write_step6(step6: Path, plan: list[_Clip], seed: int) -> tuple[Path, Path]:
    """Clusters (sources with >1 clip, as step6-1 keeps) and same-subject pairs between their clips."""
    clusters: dict[str, list[_Clip]] = {}
    for clip in plan:
        clusters.setdefault(clip.source.video_id, []).append(clip)
    clusters = {cid: members for cid, members in clusters.items() if len(members) > 1}
    pairs_dir = step6 / "cross-frames-pairs" / "final_output"
    pairs_dir.mkdir(parents=True, exist_ok=True)
    cluster_path = step6 / "cluster_videos.json"
    cluster_path.write_text(json.dumps(
        {cid: [f"{c.part}/{c.key}" for c in members] for cid, members in clusters.items()}, indent=2))
    for cid, members in clusters.items():
        rng = np.random.default_rng((seed, members[0].source.index, PAIRS_STREAM))
        pairs = []
        for a, cur in enumerate(members):
            for aft in members[a + 1:]:
                for sid, subject in enumerate(cur.source.subjects, start=1):
                    pairs.append({
                        "cur_id": f"{cur.part}/{cur.key}", "aft_id": f"{aft.part}/{aft.key}",
                        "cur_class_id": str(sid), "aft_class_id": str(sid),
                        "cur_class_name": subject.class_name, "aft_class_name": subject.class_name,
                        "text_similarity": 1.0, "image_similarity": _r(rng.uniform(0.9, 1.0)),
                        "cur_frame_idx": cur.entry["annotation"]["ann_frame_data"]["ann_frame_idx"],
                        "aft_frame_idx": aft.entry["annotation"]["ann_frame_data"]["ann_frame_idx"]})
        (pairs_dir / f"{cid}.json").write_text(json.dumps(pairs, indent=2))
    return cluster_path, pairs_dir
