"""I2V (prompt, first-frame image) datasets."""
import json

import numpy as np
import pytest
from PIL import Image

from data.i2v import I2VImageDataset, OpenS2VFirstFrameDataset, collate_i2v_batch


def _rows(tmp_path, fmt):
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 60 * i, np.uint8)).save(tmp_path / f"img{i}.png")
    rows = [{"prompt": f"prompt {i}", "image": f"img{i}.png"} for i in range(3)]
    if fmt == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path = tmp_path / "rows.csv"
        path.write_text("prompt,image\n" + "\n".join(f"{r['prompt']},{r['image']}" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_rows_give_images_and_prompts(fmt, tmp_path):
    ds = I2VImageDataset(_rows(tmp_path, fmt), height=32, width=48)
    batch = collate_i2v_batch([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, 32, 48) and batch["prompts"] == ["prompt 0", "prompt 2"]
    assert batch["image"][1].mean() == pytest.approx(120 / 127.5 - 1, abs=1e-3)


def test_missing_image_and_escaping_path_are_skipped(tmp_path):
    path = _rows(tmp_path, "jsonl")
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"prompt": "escape", "image": "../../etc/passwd"})
    (tmp_path / "img1.png").unlink()
    path.write_text("\n".join(lines))
    ds = I2VImageDataset(path, height=32, width=48)
    assert ds[0]["index"] == 2 and ds.ledger.by_kind == {"unsafe-path": 1, "missing-image": 1}


def test_image_symlinked_out_of_the_base_dir_is_skipped(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    path = _rows(base, "jsonl")
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(outside)
    (base / "img0.png").unlink()
    (base / "img0.png").symlink_to(outside)
    (base / "inside.png").symlink_to(base / "img1.png")  # a link that stays inside is followed
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"prompt": "inside", "image": "inside.png"})
    path.write_text("\n".join(lines))
    ds = I2VImageDataset(path, height=32, width=48)
    assert ds[0]["index"] == 1 and ds.ledger.by_kind == {"unsafe-path": 1}
    (detail,) = ds.ledger.last_detail.values()
    assert "field 'image'" in detail and str(outside) in detail
    assert ds[2]["prompt"] == "inside"


def test_row_without_prompt_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "image": "a.png"}) + "\n" + json.dumps({"image": "b.png"}))
    with pytest.raises(ValueError, match=r"rows.jsonl:2: row lacks field\(s\) \['prompt'\]"):
        I2VImageDataset(path)


def test_first_frames_of_opens2v_clips(demo_data):
    ds = OpenS2VFirstFrameDataset(demo_data.json_paths[0], demo_data.video_base_paths[0], height=32, width=48)
    s = ds[0]
    assert s["image"].shape == (3, 32, 48) and s["prompt"]
