"""Hostile or malformed dataset files, each written for real into a copy of the demo dataset:
symlinks out of the base directories, an RLE mask bomb, malformed numbers in the annotation JSON.
Every one must be a counted skip naming the file, the clip key and the field, never a crash or a
file read from outside the dataset."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.annotations import parse_entry
from data.cross_frames import CrossFramePairs
from data.opens2v import MultiPartOpenS2VAdapterDataset, OpenS2VAdapterDataset, create_opens2v_dataloader
from data.sampler import ResumableDistributedSampler
from data.skips import BadSample
from tests.data.test_opens2v import SMALL, _edit, _part

REPO = Path(__file__).resolve().parents[2]
# Runs [0, H * W]: an all-ones 20000 x 20000 mask in 7 bytes of COCO RLE (381 MiB decoded).
RLE_BOMB = {"size": [20000, 20000], "counts": "0PPQ_m;"}


def _where(d, key, part=0):
    return f"{d.json_paths[part]}[{key}]"


def _move_out(path: Path, outside: Path) -> Path:
    """Move `path` to `outside` (a real, readable copy there) and leave a symlink to it."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(outside))
    path.symlink_to(outside, target_is_directory=outside.is_dir())
    return outside


def _bomb_masks(entry):
    for frame in entry["annotation"]["mask_annotation"].values():
        for sid in frame:
            frame[sid] = dict(RLE_BOMB)


# ---------------------------------------------------------------------------------- symlinks
def _symlink_out(d, what, outside: Path):
    """Point one file (or directory) of clip 0 out of its base directory; returns the dataset."""
    ds = _part(d, return_background=what == "background")
    rel = Path(ds.annotation(0).video_relpath)
    if what == "video-file":
        _move_out(ds.video_base / rel, outside / rel.name)
    elif what == "video-dir":
        _move_out(ds.video_base / rel.parent, outside / rel.parent.name)
    elif what == "background":
        png = d.background_base_paths[0] / f"{ds.keys[0]}.png"
        _move_out(png, outside / png.name)
    return ds


@pytest.mark.parametrize("what", ["video-file", "video-dir", "background"])
def test_symlink_out_of_the_base_dir_is_a_counted_skip(what, demo_copy, tmp_path):
    ds = _symlink_out(demo_copy, what, tmp_path / "outside")
    rel = Path(ds.annotation(0).video_relpath)
    same_dir = [i for i in range(len(ds)) if Path(ds.annotation(i).video_relpath).parent == rel.parent]
    first_good = 1 if what != "video-dir" else min(set(range(len(ds))) - set(same_dir))
    s = ds[0]
    assert s["index"] == first_good and s["skipped"][0] == ("unsafe-path", _where(demo_copy, ds.keys[0]))
    detail = ds.ledger.last_detail[_where(demo_copy, ds.keys[0])]
    field = "metadata.path" if what != "background" else "background named by the clip key"
    assert field in detail and "outside the base directory" in detail
    assert os.path.realpath(tmp_path / "outside") in detail, "names where the symlink leads"


def test_symlink_inside_the_base_dir_is_followed(demo_copy):
    ds = _part(demo_copy)
    video = ds.video_base / ds.annotation(0).video_relpath
    _move_out(video, ds.video_base / "store" / video.name)  # deduplicated storage, still inside
    assert ds[0]["index"] == 0 and ds.ledger.bad == 0


def test_symlinked_pairs_file_out_of_the_pairs_dir_is_a_counted_skip(demo_copy, tmp_path):
    d = demo_copy
    pairs = CrossFramePairs(d.cluster_path, d.cross_frames_base_path, list(zip(d.json_paths, d.video_base_paths)))
    ds = MultiPartOpenS2VAdapterDataset(d.json_paths, d.video_base_paths, d.background_base_paths,
                                        cross_frames=pairs, is_cross_frame=True, **SMALL)
    index = next(i for i in range(len(ds)) if ds.locate(i)[0].keys[ds.locate(i)[1]] in pairs.cluster_of)
    part, local = ds.locate(index)
    cluster = pairs.cluster_of[part.keys[local]]
    _move_out(d.cross_frames_base_path / f"{cluster}.json", tmp_path / "outside" / f"{cluster}.json")
    s = ds[index]
    assert s["index"] != local and s["skipped"][0] == ("unsafe-path", f"{d.cluster_path}[{cluster}]")
    assert "cluster id" in part.ledger.last_detail[f"{d.cluster_path}[{cluster}]"]


# ---------------------------------------------------------------------------------- RLE bomb
BOMB_CHILD = """
import json, sys
from data.opens2v import OpenS2VAdapterDataset

def status(field):  # KiB, from the kernel's own accounting (pycocotools allocates with malloc)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

ds = OpenS2VAdapterDataset(sys.argv[1], sys.argv[2], None, num_training_frames=3, height=64, width=96)
ds[1]  # warm up: imports, decoder, one good sample
try:  # reset the peak to the current RSS where the kernel allows it; else measure the peak's growth
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
peak = status("VmHWM")
s = ds[0]
print(json.dumps({"index": s["index"], "skipped": s["skipped"], "peak_growth_kib": status("VmHWM") - peak,
                  "detail": ds.ledger.last_detail}))
"""


def test_rle_bomb_is_skipped_before_it_is_decoded(demo_data, tmp_path):
    """A valid 7-byte RLE declaring 20000 x 20000 would decode to 381 MiB (and 1 GB peak):
    its size is compared with the frame first, so memory stays flat and the clip is skipped."""
    key = _part(demo_data).keys[0]
    bad_json = tmp_path / demo_data.json_paths[0].name
    shutil.copy(demo_data.json_paths[0], bad_json)
    _edit(bad_json, key, _bomb_masks)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(bad_json), str(demo_data.video_base_paths[0])],
                         capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["peak_growth_kib"] < 32 * 1024, f"decoding grew the peak RSS by {out['peak_growth_kib']} KiB"
    where = f"{bad_json}[{key}]"
    assert out["index"] == 1 and out["skipped"] == [["mask-size-mismatch", where]]
    assert "annotation.mask_annotation." in out["detail"][where] and "[20000, 20000]" in out["detail"][where]


# ---------------------------------------------------------------------------- malformed numbers
def _meta(**kw):
    return lambda e: e["metadata"].update(kw)


def _subject(**kw):
    return lambda e: e["annotation"]["ann_frame_data"]["annotations"][0].update(kw)


def _frame_masks(e):
    return e["annotation"]["mask_annotation"][str(e["annotation"]["ann_frame_data"]["ann_frame_idx"])]


def _masks_as_list(e):
    masks = e["annotation"]["mask_annotation"]
    for idx in masks:
        masks[idx] = list(masks[idx].values())


def _mask_entry(**kw):
    def edit(e):
        frame = _frame_masks(e)
        frame["1"] = kw["value"] if "value" in kw else {**frame["1"], **kw}
    return edit


def _frame_idx(value):
    return lambda e: e["annotation"]["ann_frame_data"].update(ann_frame_idx=value)


# (edit, the field the skip must name): each crashed with a raw error or was silently accepted.
MALFORMED = {
    "face_cut-strings": (_meta(face_cut=["start", "end"]), "metadata.face_cut[0]"),
    "face_cut-nulls": (_meta(face_cut=[None, None]), "metadata.face_cut[0]"),
    "face_cut-infinite": (_meta(face_cut=[0, math.inf]), "metadata.face_cut[1]"),
    "face_cut-numeric-strings": (_meta(face_cut=["0", "40"]), "metadata.face_cut[0]"),
    "crop-strings": (_meta(crop=["a", "b", "c", "d"]), "metadata.crop[0]"),
    "crop-fractional": (_meta(crop=[0.5, 90, 0, 60]), "metadata.crop[0]"),
    "num_frames-string": (_meta(num_frames="81"), "metadata.num_frames"),
    "tech-score-string": (_meta(tech="high"), "metadata.tech"),
    "bbox-strings": (_subject(bbox=["x0", "y0", "x1", "y1"]), "annotations[0].bbox[0]"),
    "bbox-three-numbers": (_subject(bbox=[1, 2, 3]), "annotations[0].bbox"),
    "gme_score-string": (_subject(gme_score="high"), "annotations[0].gme_score"),
    "gme_score-null": (_subject(gme_score=None), "annotations[0].gme_score"),
    "gme_score-nan": (_subject(gme_score=math.nan), "annotations[0].gme_score"),
    "aes_score-list": (_subject(aes_score=[5.0]), "annotations[0].aes_score"),
    "class_name-number": (_subject(class_name=7), "annotations[0].class_name"),
    "ann_frame_idx-fractional": (_frame_idx(2.5), "ann_frame_data.ann_frame_idx"),
    "mask_annotation-frame-is-a-list": (_masks_as_list, "annotation.mask_annotation."),
    "mask_annotation-entry-is-a-list": (_mask_entry(value=["size", "counts"]), "annotation.mask_annotation."),
    "mask-size-strings": (_mask_entry(size=["64", "96"]), ".size[0]"),
    "mask-counts-number": (_mask_entry(counts=12345), ".counts"),
}


@pytest.fixture
def bad_json(demo_data, tmp_path):
    """A copy of part 1's annotation JSON (the videos stay the demo's, read-only)."""
    path = tmp_path / demo_data.json_paths[0].name
    shutil.copy(demo_data.json_paths[0], path)
    return path


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_field_is_a_counted_skip_naming_file_key_and_field(case, demo_data, bad_json):
    edit, field = MALFORMED[case]
    key = min(json.loads(bad_json.read_text()))  # the dataset's index 0
    where = f"{bad_json}[{key}]"
    _edit(bad_json, key, edit)
    ds = OpenS2VAdapterDataset(bad_json, demo_data.video_base_paths[0], None, **SMALL)
    with pytest.raises(BadSample) as err:  # nothing else (ValueError, TypeError, AttributeError)
        parse_entry(key, ds.entries[key], str(bad_json))
    assert err.value.kind == "bad-field" and err.value.path == where and field in err.value.detail
    s = ds[0]
    assert s["index"] == 1 and s["skipped"] == [("bad-field", where)]
    assert ds.ledger.by_kind == {"bad-field": 1} and field in ds.ledger.last_detail[where]


def test_dataloader_over_good_and_bad_clips_yields_the_good_ones_and_counts_the_rest(demo_copy, tmp_path):
    d = demo_copy
    parts = [_part(d, 0), _part(d, 1)]
    k0, k1 = parts[0].keys, parts[1].keys
    _edit(d.json_paths[0], k0[0], _subject(gme_score="high"))
    _edit(d.json_paths[0], k0[2], _bomb_masks)
    _move_out(parts[1].video_base / parts[1].annotation(1).video_relpath, tmp_path / "outside" / "clip.mp4")
    bad = {k0[0], k0[2], k1[1]}
    ds = MultiPartOpenS2VAdapterDataset(d.json_paths, d.video_base_paths, d.background_base_paths, **SMALL)
    loader = create_opens2v_dataloader(ds, batch_size=1, sampler=ResumableDistributedSampler(len(ds), shuffle=False),
                                       num_workers=0)
    keys = [key for batch in loader for key in batch.keys]
    assert len(keys) == len(ds), "every bad clip is replaced, so every rank keeps its batch count"
    assert set(keys) == (set(k0) | set(k1)) - bad
    # part 1: index 0 skips itself; index 2 skips itself, then index 0 again (its replacement)
    assert dict(ds.ledgers[0].by_kind) == {"bad-field": 2, "mask-size-mismatch": 1}
    assert dict(ds.ledgers[1].by_kind) == {"unsafe-path": 1}
    assert "3 of 6 samples skipped" in ds.ledgers[0].summary()
