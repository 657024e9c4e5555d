"""`wanspeed bench data` runs end to end on small synthetic clips and reports both rates."""
import json

import pytest

from ds_trainer.cli import main


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


def _args(*extra):
    return ["bench", "data", "--clips", "2", "--num-training-frames", "3", "--height", "32", "--width", "48",
            "--workers", "0", "--rounds", "1", *extra]


def test_bench_data_on_an_existing_part(demo_data, tmp_path):
    out = tmp_path / "bench.json"
    code = main(_args("--json", str(demo_data.json_paths[0]), "--video-base", str(demo_data.video_base_paths[0]),
                      "--out", str(out)))
    assert code == 0
    figures = json.loads(out.read_text())
    assert figures["data"] == str(demo_data.json_paths[0]) and figures["max_abs_diff_vs_baseline"] == 0.0


def test_bench_data_names_a_bad_first_clip(demo_copy):
    from tests.data.test_opens2v import _break
    _break(demo_copy, "garbage")
    with pytest.raises(SystemExit, match="unreadable-video"):
        main(_args("--json", str(demo_copy.json_paths[0]), "--video-base", str(demo_copy.video_base_paths[0])))
