"""ref_gain (ds_trainer/ref_gain.py): exactly 1 for the untrained model (zero-initialised value
paths), clearly above 1 after a short real training run, measured by the run's own validation."""
import json
from pathlib import Path

import pytest

from ds_trainer import ref_gain
from ds_trainer.demo import measure_ref_gain
from tests.ds_trainer.conftest import finished, launch


def test_swap_partners_come_from_other_source_videos():
    keys = ["vidA_part1_step1-0-9_step2-0-9_step3_step4_step5", "vidA_part2_step1-0-9_step2-0-9_step3_step4_step5",
            "vidB_part1_step1-0-9_step2-0-9_step3_step4_step5", "loose-key"]
    partners = ref_gain.swap_partners(keys)
    assert partners == [2, 2, 3, 0]
    with pytest.raises(ValueError, match="two source videos"):
        ref_gain.swap_partners(keys[:2])


def test_untrained_model_has_ref_gain_exactly_one(demo_config):
    cache = Path(demo_config).parent / "cache"
    gain = measure_ref_gain(demo_config, cache, repeats=1)
    assert gain.samples == 4 and gain.loss_own > 0
    assert gain.loss_other == gain.loss_own and gain.ratio == 1.0  # bit for bit: v = 0 adds exactly 0.0


@pytest.mark.slow
def test_a_short_trained_run_uses_its_subject_reference(demo_config, tmp_path):
    """One rank, the run's own validation (ref_gain only, on the trained clips with fresh noise)."""
    logdir = tmp_path / "run"
    finished(launch(demo_config, logdir, ranks=1, sets=(
        "max_iters=300", "log_iters=300", "warmup_steps=2", "batch_size=4",
        "validation={every: 300, ref_gain_samples: 4, ref_gain_repeats: 4}")))
    rows = [json.loads(line) for line in (logdir / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 300]
    assert rows[0]["ref_gain"] == 1.0 and rows[0]["ref_gain_loss_own"] == rows[0]["ref_gain_loss_other"]
    assert rows[1]["ref_gain"] > 1.05, rows  # the model now predicts better with the right subject (1.087)
    assert rows[1]["ref_gain_loss_own"] < rows[0]["ref_gain_loss_own"]


def test_validation_section_errors_name_the_key(demo_config, tmp_path):
    from ds_trainer.config import load_train_config
    from ds_trainer.validation import rank_slots
    from model.config import ConfigError
    with pytest.raises(ConfigError, match=r"validation\.subject_images\[0\]: no such file"):
        load_train_config(demo_config, {"validation": {"prompts": ["a"], "subject_images": [str(tmp_path / "x.png")]}})
    (tmp_path / "s.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"validation\.subject_images: needs one image per prompt \(3\)"):
        load_train_config(demo_config, {"validation": {"prompts": ["a", "b", "c"],
                                                       "subject_images": [str(tmp_path / "s.png")] * 2}})
    with pytest.raises(ConfigError, match=r"validation\.every: must be >= 1"):
        load_train_config(demo_config, {"validation": {"every": 0}})
    # 3 prompts over 2 ranks: rank 1 runs a stand-in, so both run two samplings
    assert rank_slots(3, 0, 2) == [0, 2] and rank_slots(3, 1, 2) == [1, None]


def test_validation_videos_are_logged_to_wandb_as_videos(tmp_path):
    """Rank 0's logging of a validation: validation.jsonl and wandb (offline) media files."""
    import torch
    import wandb

    from ds_trainer.validation import Validator, ValidationSection
    from ds_trainer.video_out import Mp4Writer, contact_sheet
    validator = Validator(ValidationSection(), None, tmp_path, 0, 1, (32, 48), (2, 4, 6), 1.0, 4, None,
                          None, torch.device("cpu"))
    video = torch.rand(3, 5, 32, 48) * 2 - 1
    out = validator.step_dir(7) / "prompt_00.mp4"
    with Mp4Writer(out, 4) as writer:
        writer.append(video)
    contact_sheet(video, [video[:, 0]], out.with_suffix(".png"))
    run = wandb.init(project="t", dir=str(tmp_path), mode="offline")
    validator._log(7, {"ref_gain": 1.25}, run)
    run.finish()
    row = json.loads((tmp_path / "validation.jsonl").read_text())
    assert row["step"] == 7 and row["ref_gain"] == 1.25 and row["videos"] == [str(out)]
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/videos/validation/*.mp4"))
    assert len(media) == 1 and media[0].stat().st_size > 0
    assert list((tmp_path / "wandb").glob("offline-run-*/files/media/images/validation/*.png"))
