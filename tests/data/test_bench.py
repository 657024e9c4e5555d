"""`wanspeed bench data` runs end to end on small synthetic clips and reports both rates."""
import json
import logging

import pytest

from data.opens2v import OpenS2VAdapterDataset
from ds_trainer.commands import main


def test_bench_data_runs_and_checks_both_paths_agree(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "data", "--clips", "2", "--source-frames", "40", "--source-height", "64",
                 "--source-width", "96", "--height", "32", "--width", "48", "--num-training-frames", "3",
                 "--workers", "0", "--out", str(out)])
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["max_abs_diff_vs_baseline"] == 0.0  # the same frames, decoded two ways
    assert figures["loader_s_per_clip"] > 0 and figures["baseline_decode_all_s_per_clip"] > 0
    assert figures["decode_only_sampled_frames_s"] > 0 and figures["dataloader_0_workers_clips_per_s"] > 0
    assert figures["pixel_frames"] == 9
    assert figures["clips"] == 2 and figures["skipped_bad_clips"] == 0 and figures["skipped_clip_files"] == []
    assert figures["rounds"] == 2 and figures["workers"] == 0  # an option not given takes DataBench's default


def _args(*extra):
    return ["bench", "data", "--clips", "2", "--num-training-frames", "3", "--height", "32", "--width", "48",
            "--workers", "0", "--rounds", "1", *extra]


def _part_args(d):
    return "--json", str(d.json_paths[0]), "--video-base", str(d.video_base_paths[0])


def test_bench_data_on_an_existing_part(demo_data, tmp_path):
    out = tmp_path / "bench.json"
    code = main(_args(*_part_args(demo_data), "--out", str(out)))
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["data"] == str(demo_data.json_paths[0]) and figures["max_abs_diff_vs_baseline"] == 0.0


def test_bench_data_names_a_bad_first_clip(demo_copy):
    from tests.data.test_opens2v import _break
    _break(demo_copy, "garbage")
    with pytest.raises(SystemExit, match="unreadable-video"):
        main(_args(*_part_args(demo_copy)))


def test_bench_data_counts_and_names_a_bad_later_clip(demo_copy, tmp_path, caplog):
    part = OpenS2VAdapterDataset(demo_copy.json_paths[0], demo_copy.video_base_paths[0], None)
    first, second = (part.video_base / part.annotation(i).video_relpath for i in (0, 1))
    assert first != second and len(part) >= 3
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 3])  # a real mp4, truncated
    out = tmp_path / "bench.json"
    with caplog.at_level(logging.WARNING, logger="data.bench"):
        code = main(_args(*_part_args(demo_copy), "--clips", "3", "--rounds", "2", "--out", str(out)))
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["skipped_bad_clips"] == 1 and figures["skipped_clip_files"] == [str(second)]
    assert figures["clips"] == 2 and figures["loader_s_per_clip"] > 0
    assert figures["dataloader_0_workers_clips_per_s"] > 0
    warnings = [r.getMessage() for r in caplog.records if "skipping bad clip" in r.getMessage()]
    assert len(warnings) == 1 and str(second) in warnings[0]  # logged once, not once per round
