"""The synthetic OpenS2V dataset: layout, decodable videos, exact masks, fields, step-6 pairs, determinism."""
import json
import re
from pathlib import Path

import decord
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data.synthetic import PALETTE, SHAPES, make_demo_dataset

KEY_RE = re.compile(r"^(?P<stem>(?P<vid>.+)_part\d+)_step1-(\d+)-(\d+)_step2-(\d+)-(\d+)_step3_step4_step5(_step6)?$")
# Decoded (x264, yuv420p) against drawn pixels, in uint8 levels.
SUBJECT_COLOUR_TOL = 25.0   # |mean RGB inside the eroded mask - palette colour|
PIXEL_TOL = 70.0           # one pixel inside: texture shade (28 * sqrt(3)) plus compression
BACKGROUND_TOL = 6.0        # mean |frame - background PNG| outside the dilated masks
EDGE = 2                    # pixels of chroma bleed excluded at mask borders


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), clips=8, parts=2)


def _clips(dataset):
    """(part index, key, entry) for every clip."""
    for p, path in enumerate(dataset.json_paths):
        for key, entry in json.loads(path.read_text()).items():
            yield p, key, entry


def _decode(rle: dict) -> np.ndarray:
    # as the OpenS2V loader does: counts str -> bytes, size [H, W]
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("utf-8")}).astype(bool)


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square."""
    h, w = mask.shape
    padded = np.pad(mask, r)
    return np.any([padded[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)], axis=0)


def test_every_file_is_where_the_layout_says(demo):
    root = demo.root
    assert demo.parts == ["demo_part1", "demo_part2"]
    assert demo.json_paths == [root / f"step5/merge_final_json/{p}.json" for p in demo.parts]
    assert demo.video_base_paths == [root / f"step0/videos/{p}" for p in demo.parts]
    assert demo.background_base_paths == [root / f"step5/final_output/{p}/foreground" for p in demo.parts]
    assert demo.cluster_path == root / "step6/cluster_videos.json"
    assert demo.cross_frames_base_path == root / "step6/cross-frames-pairs/final_output"
    clips = list(_clips(demo))
    assert len(clips) == 8 and [len(k) for k in demo.keys] == [4, 4]
    for p, key, entry in clips:
        path = entry["metadata"]["path"]
        assert "/" in path, "videos live in subdirectories"
        assert (demo.video_base_paths[p] / path).is_file()
        assert Path(path).stem != key and KEY_RE.match(key)["stem"] == Path(path).stem  # issue #7
        assert (demo.background_base_paths[p] / f"{key}.png").is_file()
    for snippet_path in [*demo.json_paths, *demo.video_base_paths, *demo.background_base_paths]:
        assert f'"{snippet_path}"' in demo.config_snippet()


def test_videos_decode_with_the_declared_length_size_and_fps(demo):
    for p, key, entry in _clips(demo):
        meta = entry["metadata"]
        vr = decord.VideoReader(str(demo.video_base_paths[p] / meta["path"]))
        assert len(vr) == meta["num_frames"] == 49
        assert vr[0].shape == (meta["resolution"]["height"], meta["resolution"]["width"], 3) == (96, 160, 3)
        assert vr.get_avg_fps() == pytest.approx(meta["fps"]) and meta["fps"] == 16.0
        background = np.asarray(Image.open(demo.background_base_paths[p] / f"{key}.png"))
        assert background.shape == (96, 160, 3) and background.dtype == np.uint8  # RGB, no alpha


def test_every_mask_is_the_drawn_subject(demo):
    for p, key, entry in _clips(demo):
        ann = entry["annotation"]
        idx = ann["ann_frame_data"]["ann_frame_idx"]
        frame = decord.VideoReader(str(demo.video_base_paths[p] / entry["metadata"]["path"]))[idx].asnumpy()
        frame = frame.astype(np.float64)
        background = np.asarray(Image.open(demo.background_base_paths[p] / f"{key}.png"), dtype=np.float64)
        masks = []
        for sid, rle in ann["mask_annotation"][str(idx)].items():
            box = ann["ann_frame_data"]["annotations"][int(sid) - 1]
            assert ann["mask_map"][sid]["class_name"] == box["class_name"]
            colour, shape = box["class_name"].split()
            mask = _decode(rle)
            masks.append(mask)
            x, y, w, h = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
            assert box["bbox"] == pytest.approx([x, y, x + w, y + h], abs=1.0), key
            assert mask.sum() == pytest.approx(w * h * SHAPES[shape][1], rel=0.15), (key, shape)
            inner = ~_grow(~mask, EDGE)
            distance = np.linalg.norm(frame[inner] - PALETTE[colour], axis=1)
            assert np.linalg.norm(frame[inner].mean(axis=0) - PALETTE[colour]) < SUBJECT_COLOUR_TOL, (key, colour)
            assert np.mean(distance < PIXEL_TOL) > 0.95, (key, colour)  # every textured pixel, not just the mean
            assert np.abs(frame[inner] - background[inner]).mean() > 50, "the mask covers the subject, not background"
        assert sum(m.sum() for m in masks) == np.any(masks, axis=0).sum(), "subjects never overlap"
        outside = ~_grow(np.any(masks, axis=0), EDGE)
        assert np.abs(frame[outside] - background[outside]).mean() < BACKGROUND_TOL, key


def test_entries_carry_every_field_and_the_old_variant_has_cap(demo):
    old, step6, short_cut, cropped = [], [], [], []
    for p, key, entry in _clips(demo):
        meta, tags, ann = entry["metadata"], entry["word_tags"], entry["annotation"]
        frames, (h, w) = meta["num_frames"], (meta["resolution"]["height"], meta["resolution"]["width"])
        assert {"path", "cut", "face_cut", "crop", "fps", "num_frames", "resolution", "tech", "motion",
                "aesthetic"} <= meta.keys()
        if "cap" in meta:
            old.append(key)
            assert "face_cap_qwen" not in meta and isinstance(meta["cap"], list) and isinstance(meta["cap"][0], str)
            caption = meta["cap"][0]
        else:
            caption = meta["face_cap_qwen"]
        step6 += [key] if key.endswith("_step6") else []
        m = KEY_RE.match(key)
        assert [int(g) for g in m.groups()[2:6]] == meta["cut"] + meta["face_cut"]
        assert 0 <= meta["face_cut"][0] < meta["face_cut"][1] <= frames == meta["cut"][1]
        short_cut += [key] if meta["face_cut"] != [0, frames] else []
        x0, x1, y0, y1 = meta["crop"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        cropped += [key] if meta["crop"] != [0, w, 0, h] else []
        assert set(tags) == {"background", "subject", "object", "pre_define"}
        assert all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in tags.values())
        data = ann["ann_frame_data"]
        assert data["box_format"] == "xyxy" and (data["img_width"], data["img_height"]) == (w, h)
        assert meta["face_cut"][0] <= data["ann_frame_idx"] < meta["face_cut"][1]
        assert isinstance(data["foreground_ase_score"], float) and isinstance(data["background_ase_score"], float)
        assert list(ann["mask_map"]) == [str(i) for i in range(1, len(data["annotations"]) + 1)]
        assert list(ann["mask_annotation"]) == [str(data["ann_frame_idx"])]
        for sid, box in enumerate(data["annotations"], start=1):
            assert {"class_name", "bbox", "gme_score", "aes_score"} == box.keys()
            assert len(box["bbox"]) == 4 and all(isinstance(v, float) for v in box["bbox"])
            bx0, by0, bx1, by1 = box["bbox"]
            assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1, "a crop never cuts a subject"
            rle = ann["mask_annotation"][str(data["ann_frame_idx"])][str(sid)]
            assert rle["size"] == [h, w] and isinstance(rle["counts"], str) and len(rle["score"]) == 1
            colour, shape = box["class_name"].split()
            assert f"{colour} {SHAPES[shape][0]} {shape}" in caption, "the caption names each subject"
    assert len(old) == 2 and len(step6) == 1 and set(step6) <= set(old)
    assert short_cut and cropped, "seed 0 covers a shorter face_cut and a real crop"


def test_step6_clusters_and_pairs_point_at_clips_in_the_json(demo):
    entries = {f"{demo.parts[p]}/{key}": entry for p, key, entry in _clips(demo)}
    by_source: dict[str, set] = {}
    for part_key in entries:
        by_source.setdefault(part_key.split("/", 1)[1].split("_part")[0], set()).add(part_key)
    clusters = json.loads(demo.cluster_path.read_text())
    assert {cid: set(members) for cid, members in clusters.items()} == \
        {cid: members for cid, members in by_source.items() if len(members) > 1}
    assert clusters, "8 clips give at least one cluster"
    for cid, members in clusters.items():
        assert len({m.split("/", 1)[0] for m in members}) == 1, "a source video stays in one part"
        pairs = json.loads((demo.cross_frames_base_path / f"{cid}.json").read_text())
        assert pairs
        for pair in pairs:
            assert pair["cur_id"] != pair["aft_id"] and {pair["cur_id"], pair["aft_id"]} <= set(members)
            for side in ("cur", "aft"):
                ann = entries[pair[f"{side}_id"]]["annotation"]
                assert pair[f"{side}_frame_idx"] == ann["ann_frame_data"]["ann_frame_idx"]
                assert ann["mask_map"][pair[f"{side}_class_id"]]["class_name"] == pair[f"{side}_class_name"]
            assert 0.6 <= pair["text_similarity"] <= 1 and 0.6 <= pair["image_similarity"] <= 1
    assert sorted(p.stem for p in demo.cross_frames_base_path.iterdir()) == sorted(clusters)


def test_same_seed_same_json_other_seed_other_json(demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", clips=8, parts=2)
    for a, b in zip(demo.json_paths + [demo.cluster_path], again.json_paths + [again.cluster_path]):
        assert a.read_bytes() == b.read_bytes()
    for a, b in zip(sorted(demo.cross_frames_base_path.iterdir()), sorted(again.cross_frames_base_path.iterdir())):
        assert a.read_bytes() == b.read_bytes()
    other = make_demo_dataset(tmp_path / "other", clips=2, seed=1, frames=5)
    first = make_demo_dataset(tmp_path / "first", clips=2, seed=0, frames=5)
    assert other.json_paths[0].read_text() != first.json_paths[0].read_text()


@pytest.mark.parametrize("clips, flag, n_old", [(3, None, 0), (4, None, 1), (4, False, 0), (2, True, 1)])
def test_old_variant_flag(tmp_path, clips, flag, n_old):
    dataset = make_demo_dataset(tmp_path, clips=clips, frames=3, height=32, width=48, old_variants=flag)
    assert sum("cap" in e["metadata"] for _, _, e in _clips(dataset)) == n_old


def test_odd_sizes_and_a_single_frame_decode(tmp_path):
    dataset = make_demo_dataset(tmp_path, clips=1, frames=1, height=34, width=50, fps=7.5, cross_frames=False)
    _, key, entry = next(_clips(dataset))
    vr = decord.VideoReader(str(dataset.video_base_paths[0] / entry["metadata"]["path"]))
    assert len(vr) == 1 and vr[0].shape == (34, 50, 3)
    assert dataset.cluster_path is None and not (tmp_path / "step6").exists()


def test_cli_writes_the_dataset_and_prints_the_config_snippet(tmp_path, capsys):
    from ds_trainer.commands import main

    out = tmp_path / "cli"
    assert main(["make-demo-data", "--out", str(out), "--clips", "3", "--parts", "2", "--frames", "9",
                 "--height", "32", "--width", "48", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    for part in ("demo_part1", "demo_part2"):
        json_path = out / f"step5/merge_final_json/{part}.json"
        assert json_path.is_file() and f'"{json_path}"' in printed
    assert "json_paths:" in printed and "video_base_paths:" in printed and "background_base_paths:" in printed
    assert len(list((out / "step0/videos").rglob("*.mp4"))) == 3
    assert main(["make-demo-data", "--out", str(out), "--clips", "1", "--parts", "2"]) == 2
