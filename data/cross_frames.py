"""OpenS2V step-6 cross-frame pairs (upstream.md §4.3): the same subject in another clip of the
same source video, so the reference image is not a crop of the frames being denoised.

Files: `cluster_videos.json` = {cluster_id: ["<part>/<clip key>", ...]} and
`<pairs_base>/<cluster_id>.json` = [{cur_id, aft_id, cur_class_id, aft_class_id, ...}, ...].
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from data.annotations import ClipAnnotation, SubjectAnnotation, load_annotation_file, parse_entry
from data.paths import resolve_under
from data.skips import BadSample

log = logging.getLogger(__name__)


class CrossFramePairs:
    """Lookup of cross-clip subject pairs across every dataset part."""

    def __init__(self, cluster_path: str | Path, pairs_base: str | Path, parts: list[tuple[str | Path, str | Path]]):
        """parts: (annotation json path, video base path) of every part that clusters may reference."""
        self.pairs_base, self.cluster_path = Path(pairs_base), Path(cluster_path)
        try:
            clusters = json.loads(Path(cluster_path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{cluster_path}: cannot read the step-6 cluster file: {exc}") from exc
        if not isinstance(clusters, dict):
            raise ValueError(f"{cluster_path}: expected {{cluster id: [clip id, ...]}}, got {type(clusters).__name__}")
        for cid, members in clusters.items():
            if not isinstance(members, list):
                raise ValueError(f"{cluster_path}: cluster '{cid}' must be a list of clip ids, "
                                 f"got {type(members).__name__}")
        self.cluster_of = {_clip_key(member): cid for cid, members in clusters.items() for member in members}
        self.entries: dict[str, tuple[dict, str, Path]] = {}
        for json_path, video_base in parts:
            for key, entry in load_annotation_file(Path(json_path)).items():
                self.entries[key] = (entry, str(json_path), Path(video_base))
        self._pairs: dict[str, list[dict]] = {}

    def _pairs_of(self, cluster_id: str) -> list[dict]:
        """`<pairs_base>/<cluster id>.json` (its real path inside pairs_base): a list of pair objects."""
        if cluster_id not in self._pairs:
            path = resolve_under(self.pairs_base, f"{cluster_id}.json", f"{self.cluster_path}[{cluster_id}]",
                                 "cluster id (names the pairs file)")
            try:
                pairs = json.loads(path.read_text()) if path.is_file() else []
            except (OSError, ValueError) as exc:
                raise BadSample("bad-pairs-file", str(path), str(exc)[:200]) from exc
            if not isinstance(pairs, list) or not all(isinstance(p, dict) for p in pairs):
                raise BadSample("bad-pairs-file", str(path), "expected a list of pair objects {cur_id, aft_id, ...}")
            self._pairs[cluster_id] = pairs
        return self._pairs[cluster_id]

    def video_base_for(self, key: str) -> Path:
        return self.entries[key][2]

    def pick(self, key: str, rng: np.random.Generator) -> Optional[tuple[ClipAnnotation, list[SubjectAnnotation]]]:
        """A random pair whose `cur_id` is `key`: the other clip's annotation and its subject.
        None when the clip has no usable pair (the caller keeps the same-clip subject)."""
        cluster = self.cluster_of.get(key)
        if cluster is None:
            return None
        pairs = [p for p in self._pairs_of(cluster)
                 if _clip_key(p.get("cur_id")) == key and _clip_key(p.get("aft_id")) in self.entries]
        if not pairs:
            return None
        pair = pairs[int(rng.integers(len(pairs)))]
        aft = _clip_key(pair["aft_id"])
        entry, json_path, _ = self.entries[aft]
        other = parse_entry(aft, entry, json_path)
        wanted = str(pair.get("aft_class_id"))
        subjects = [s for s in other.subjects if s.ann_id == wanted] or other.subjects[:1]
        return other, subjects


def _clip_key(clip_id) -> str:
    """Pair and cluster ids may be `<part>/<clip key>` or the bare clip key."""
    return str(clip_id).split("/")[-1]
