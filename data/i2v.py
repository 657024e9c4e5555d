"""(prompt, first-frame image) datasets for image-to-video Self-Forcing / LongLive training.

- `I2VImageDataset`: rows `{"prompt", "image"}` from a JSONL or CSV file; image paths are
  relative to the file's directory (or `image_base`) and may not escape it.
- `OpenS2VFirstFrameDataset`: the first sampled frame and caption of OpenS2V clips.

Output per sample: image [3, H, W] in [-1, 1] (cover-resized, centre-cropped), prompt.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from data.opens2v import OpenS2VAdapterDataset
from data.options import DatasetOptions
from data.paths import resolve_under
from data.skips import BadSample, SkipLedger, TooManyBadSamples
from data.video import image_to_model, load_rgb_image

MAX_REPLACEMENT_TRIES = 64


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a .jsonl / .csv file with `prompt` and `image` fields; a bad row names its line."""
    rows = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: invalid JSON: {exc}") from exc
    elif path.suffix == ".csv":
        with path.open(newline="") as fh:
            rows = [(n, r) for n, r in enumerate(csv.DictReader(fh), start=2)]
    else:
        raise ValueError(f"{path}: expected a .jsonl or .csv file of {{prompt, image}} rows")
    out = []
    for n, row in rows:
        missing = [k for k in ("prompt", "image") if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise ValueError(f"{path}:{n}: row lacks field(s) {missing}")
        out.append({"prompt": row["prompt"].strip(), "image": row["image"].strip()})
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


class I2VImageDataset(Dataset):
    def __init__(self, path: str | Path, height: int = 480, width: int = 832, image_base: Optional[str | Path] = None,
                 image_policy: str = "convert", max_bad_fraction: float = 0.2):
        self.path = Path(path)
        self.rows = read_rows(self.path)
        self.base = Path(image_base) if image_base else self.path.parent
        self.height, self.width, self.image_policy = height, width, image_policy
        self.ledger = SkipLedger(max_bad_fraction=max_bad_fraction)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image_path = resolve_under(self.base, row["image"], f"{self.path}[row {index}]", "image")
        image = load_rgb_image(image_path, self.image_policy)
        return {"image": image_to_model(image, self.height, self.width), "prompt": row["prompt"]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(MAX_REPLACEMENT_TRIES):
            i = (index + attempt) % len(self)
            try:
                sample = self.load(i)
            except BadSample as err:
                self.ledger.record(err)
                continue
            self.ledger.ok()
            return {**sample, "index": i}
        raise TooManyBadSamples(f"{MAX_REPLACEMENT_TRIES} consecutive bad rows from {index} in {self.path}")


class OpenS2VFirstFrameDataset(Dataset):
    """First sampled frame + caption of each OpenS2V clip (decodes a single frame)."""

    def __init__(self, json_path, video_base_path, height: int = 480, width: int = 832, **options: Any):
        opts = DatasetOptions.build(num_training_frames=1, height=height, width=width, **options)
        self.clips = OpenS2VAdapterDataset(json_path, video_base_path, None, opts)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.clips[index]
        return {"image": s["video"][:, 0], "prompt": s["prompt"], "index": s["index"]}


def collate_i2v_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """image [B, 3, H, W]; prompts: list of B strings; indices [B]."""
    return {"image": torch.stack([s["image"] for s in samples]), "prompts": [s["prompt"] for s in samples],
            "indices": torch.tensor([s["index"] for s in samples])}
