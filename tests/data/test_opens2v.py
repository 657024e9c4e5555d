"""OpenS2V datasets on real mp4 / PNG / RLE files: sampling, subjects, and every kind of bad input
as a counted, logged skip (each made from a real broken file)."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data.cross_frames import CrossFramePairs
from data.opens2v import (MultiPartOpenS2VAdapterDataset, OpenS2VAdapterDataset, collate_opens2v_batch,
                          create_opens2v_dataloader)
from data.sampler import ResumableDistributedSampler
from data.skips import TooManyBadSamples
from data.video import pixel_frames, sample_frame_indices

SMALL = dict(num_training_frames=3, height=64, width=96)


def _part(d, i=0, **kw):
    return OpenS2VAdapterDataset(d.json_paths[i], d.video_base_paths[i], d.background_base_paths[i], **{**SMALL, **kw})


def _edit(json_path, key, fn):
    data = json.loads(json_path.read_text())
    fn(data[key])
    json_path.write_text(json.dumps(data))


def test_sample_shapes_and_ranges(demo_data):
    ds = _part(demo_data, return_background=True, return_foreground=True)
    s = ds[0]
    assert s["index"] == 0 and s["skipped"] == []
    assert s["video"].shape == (3, pixel_frames(3), 64, 96) == (3, 9, 64, 96)
    assert -1.0 <= s["video"].min() and s["video"].max() <= 1.0 and s["video"].std() > 0.05
    assert s["subject_images"].shape == (1, 3, 64, 96)
    assert s["background_image"].shape == s["foreground_image"].shape == (3, 64, 96)
    assert isinstance(s["prompt"], str) and len(s["prompt"]) > 10
    assert len(s["frame_indices"]) == 9


def test_subject_is_cut_out_on_white(demo_data):
    s = _part(demo_data, subject_size=(64, 64))[1]
    img = s["subject_images"][0]
    corners = img[:, [0, -1]][:, :, [0, -1]]
    assert torch.all(corners > 0.95), "letterbox / outside-mask pixels must be white"
    assert (img < 0.5).any(), "the subject itself is coloured"


def test_frame_sampling_follows_the_upstream_rule():
    rng = np.random.default_rng(0)
    idx = sample_frame_indices(10, 200, 9, 3, rng)
    assert np.all(np.diff(idx) == 3) and idx[0] >= 10 and idx[-1] < 200
    short = sample_frame_indices(5, 9, 9, 3, rng)  # 4 frames for 9: repeat, in order
    assert len(short) == 9 and short[0] == 5 and short[-1] == 8 and np.all(np.diff(short) >= 0)
    mid = sample_frame_indices(0, 20, 9, 3, rng)  # range shorter than the strided span: even spacing
    assert mid[0] == 0 and mid[-1] == 19


def test_random_choices_are_fixed_by_seed_epoch_and_index(demo_data):
    a, b = _part(demo_data, seed=1), _part(demo_data, seed=1)
    torch.testing.assert_close(a[2]["frame_indices"], b[2]["frame_indices"])
    torch.testing.assert_close(a[2]["video"], b[2]["video"])
    draws = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        draws.add(tuple(a.plan(2).frame_indices.tolist()))
    assert len(draws) > 1, "the frame start is re-drawn each epoch"


def test_old_annotation_variants_are_read(demo_data):
    entries = {}
    for p in demo_data.json_paths:
        entries.update(json.loads(p.read_text()))
    old = [k for k, e in entries.items() if "face_cap_qwen" not in e["metadata"]]
    assert old, "the demo data carries old-format entries"
    ds = MultiPartOpenS2VAdapterDataset(demo_data.json_paths, demo_data.video_base_paths,
                                        demo_data.background_base_paths, **SMALL)
    for i in range(len(ds)):
        part, local = ds.locate(i)
        if part.keys[local] in old:
            assert ds[i]["prompt"] == entries[part.keys[local]]["metadata"]["cap"][0]


def test_subject_selection_strategies(demo_data):
    for i in range(len(demo_data.json_paths)):
        ds = _part(demo_data, i, max_subjects_per_sample=3, subject_selection="best_score")
        multi = [j for j in range(len(ds)) if len(ds.annotation(j).subjects) >= 2]
        if multi:
            break
    assert multi, "the demo data has clips with two subjects"
    j = multi[0]
    subjects = ds.annotation(j).subjects
    assert [s.aes_score for s in ds.plan(j).subjects] == sorted((s.aes_score for s in subjects), reverse=True)
    assert _part(demo_data, i, subject_selection="first").plan(j).subjects[0].ann_id == "1"
    picks = set()
    rnd = _part(demo_data, i, subject_selection="random")
    for epoch in range(8):
        rnd.set_epoch(epoch)
        picks.add(rnd.plan(j).subjects[0].ann_id)
    assert len(picks) == 2
    assert ds[j]["subject_images"].shape[0] == len(subjects)


def test_collate_pads_subjects_with_white(demo_data):
    ds = MultiPartOpenS2VAdapterDataset(demo_data.json_paths, demo_data.video_base_paths,
                                        demo_data.background_base_paths, max_subjects_per_sample=2, **SMALL)
    batch = collate_opens2v_batch([ds[i] for i in range(len(ds))])
    assert batch.video.shape == (len(ds), 3, 9, 64, 96)
    r = batch.subject_images.shape[1]
    for b, n in enumerate(batch.ref_counts.tolist()):
        if n < r:
            assert torch.all(batch.subject_images[b, n:] == 1.0)


def test_cross_frame_subject_comes_from_another_clip(demo_data):
    parts = list(zip(demo_data.json_paths, demo_data.video_base_paths))
    pairs = CrossFramePairs(demo_data.cluster_path, demo_data.cross_frames_base_path, parts)
    ds = MultiPartOpenS2VAdapterDataset(demo_data.json_paths, demo_data.video_base_paths,
                                        demo_data.background_base_paths, cross_frames=pairs, is_cross_frame=True, **SMALL)
    crossed = 0
    for i in range(len(ds)):
        part, local = ds.locate(i)
        plan = part.plan(local)
        if plan.subject_source.key != plan.ann.key:
            crossed += 1
            assert pairs.cluster_of[plan.subject_source.key] == pairs.cluster_of[plan.ann.key]
            assert ds[i]["subject_images"].shape[0] == 1
    assert crossed > 0


# ----------------------------------------------------------------------------------- bad input
def _break_first_video(d, how):
    ds = _part(d)
    path = ds.video_base / ds.annotation(0).video_relpath
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if how == "truncate" else b"\x00not an mp4" * 100)


def _break(d, kind):
    key = OpenS2VAdapterDataset(d.json_paths[0], d.video_base_paths[0], None, **SMALL).keys[0]
    j = d.json_paths[0]
    if kind in ("truncated", "garbage"):
        _break_first_video(d, "truncate" if kind == "truncated" else "garbage")
    elif kind == "too-few-frames":
        _edit(j, key, lambda e: e["metadata"].update(face_cut=[400, 480]))
    elif kind == "missing-background":
        for stem in (key, key + "_step5"):
            (d.background_base_paths[0] / f"{stem}.png").unlink(missing_ok=True)
    elif kind == "corrupt-rle":
        def corrupt(e):
            masks = e["annotation"]["mask_annotation"]
            for frame in masks.values():
                for m in frame.values():
                    m["counts"] = "\x7f\x00garbage!!"
        _edit(j, key, corrupt)
    elif kind == "missing-field":
        _edit(j, key, lambda e: e["metadata"].pop("path"))
    elif kind == "escaping-path":
        _edit(j, key, lambda e: e["metadata"].update(path="../../../etc/passwd"))
    elif kind == "absolute-path":
        _edit(j, key, lambda e: e["metadata"].update(path="/etc/passwd"))
    return key


BAD_KINDS = {"truncated": "video", "garbage": "unreadable-video", "too-few-frames": "too-few-frames",
             "missing-background": "missing-background", "corrupt-rle": "corrupt-rle",
             "missing-field": "missing-field", "escaping-path": "unsafe-path", "absolute-path": "unsafe-path"}


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_input_is_a_counted_logged_skip(kind, demo_copy, caplog):
    _break(demo_copy, kind)
    ds = _part(demo_copy, return_background=True)
    with caplog.at_level(logging.WARNING, logger="data.skips"):
        first = ds[0]
        again = ds[0]
    assert first["index"] == 1 and first["requested_index"] == 0, "replaced by the next good sample"
    assert len(first["skipped"]) == 1 and BAD_KINDS[kind] in first["skipped"][0][0]
    assert again["index"] == 1
    assert ds.ledger.bad == 2 and ds.ledger.attempts == 4
    warnings = [r for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(warnings) == 1, "one warning per kind, then counted"
    assert "skipped" in ds.ledger.summary()


def test_bad_sample_through_a_two_worker_dataloader_never_raises(demo_copy):
    _break(demo_copy, "garbage")
    ds = MultiPartOpenS2VAdapterDataset(demo_copy.json_paths, demo_copy.video_base_paths,
                                        demo_copy.background_base_paths, **SMALL)
    sampler = ResumableDistributedSampler(len(ds), shuffle=False)
    batches = list(create_opens2v_dataloader(ds, batch_size=2, sampler=sampler, num_workers=2))
    assert len(batches) == len(ds) // 2  # nothing dropped: replaced
    assert sum(len(b.skipped) for b in batches) == 1


def test_a_mostly_broken_dataset_stops_naming_the_worst_file(demo_copy):
    ds = _part(demo_copy, max_bad_fraction=0.2)
    ds.ledger.min_attempts = 4
    for key in ds.keys[:-1]:
        _edit(demo_copy.json_paths[0], key, lambda e: e["metadata"].update(path="missing/video.mp4"))
    ds = _part(demo_copy, max_bad_fraction=0.2)
    ds.ledger.min_attempts = 4
    with pytest.raises(TooManyBadSamples, match=r"worst file: .*missing/video\.mp4"):
        for i in range(len(ds)):
            ds[i]


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16"])
def test_odd_background_images_convert_or_skip(mode, demo_copy):
    ds = _part(demo_copy, return_background=True)
    key = ds.keys[0]
    png = demo_copy.background_base_paths[0] / f"{key}.png"
    rgb = np.asarray(Image.open(png).convert("RGB"))
    if mode == "RGBA":
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        alpha[:, : rgb.shape[1] // 2] = 0  # left half transparent -> white
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(png)
    elif mode == "L":
        Image.fromarray(rgb.mean(-1).astype(np.uint8), "L").save(png)
    else:
        Image.fromarray((rgb.mean(-1) * 257).astype(np.uint16)).save(png)  # 16-bit grayscale
    assert Image.open(png).mode.startswith(mode[:1])
    bg = ds[0]["background_image"]
    assert ds[0]["index"] == 0 and bg.shape == (3, 64, 96)
    if mode == "RGBA":
        assert torch.all(bg[:, :, :40] > 0.99), "transparent pixels composite onto white"
    else:
        torch.testing.assert_close(bg[0], bg[1])  # gray replicated to RGB
        assert bg.min() < 0.9
    skipping = _part(demo_copy, return_background=True, image_policy="skip")
    assert skipping[0]["index"] == 1 and skipping[0]["skipped"][0][0].startswith("image-mode-")


def test_background_filename_fallbacks(demo_copy):
    ds = _part(demo_copy, return_background=True)
    key = ds.keys[0]
    png = demo_copy.background_base_paths[0] / f"{key}.png"
    png.rename(png.with_name(f"{key}_step5.png"))  # what OpenS2V step 5-2 writes (upstream #7)
    assert ds[0]["index"] == 0


def test_unequal_part_lists_and_bad_options_are_clear_errors(demo_data):
    with pytest.raises(ValueError, match="equal lengths"):
        MultiPartOpenS2VAdapterDataset(demo_data.json_paths, demo_data.video_base_paths[:1])
    with pytest.raises(ValueError, match="subject_selection"):
        _part(demo_data, subject_selection="biggest")
    with pytest.raises(ValueError, match="is_cross_frame"):
        _part(demo_data, is_cross_frame=True)
