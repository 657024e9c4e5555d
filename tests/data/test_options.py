"""The `opens2v:` config section is the data options: checked at load, and every key reaches
the dataset that `ds_trainer.datasets.opens2v_dataset` builds from a run config."""

import pytest

from data.options import DatasetOptions, OpenS2VSection
from ds_trainer.config import load_train_config
from ds_trainer.datasets import opens2v_dataset
from model.config import ConfigError

RUN = """
seed: 7
cache_dir: /unused
model: {preset: tiny}
num_training_frames: 2
pixel_height: 32
pixel_width: 48
"""


def _config(tmp_path, demo, *data_lines):
    """The demo's `opens2v:` block plus `data_lines` inside it, then the run-level keys."""
    path = tmp_path / "run.yaml"
    path.write_text(demo.config_snippet() + "\n" + "".join(f"  {line}\n" for line in data_lines) + RUN)
    return path


@pytest.mark.parametrize("line, key", [
    ("subject_selection: frist", "opens2v.subject_selection"),
    ("image_policy: drop", "opens2v.image_policy"),
    ("max_bad_fraction: 1.5", "opens2v.max_bad_fraction"),
    ("sample_stride: 0", "opens2v.sample_stride"),
    ("subject_size: [0, 64]", "opens2v.subject_size"),
    ("return_backgrounds: true", "opens2v.return_backgrounds"),
])
def test_a_bad_opens2v_value_fails_at_load_even_with_a_cache_dir(tmp_path, demo_data, line, key):
    path = _config(tmp_path, demo_data, line)
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert str(err.value).startswith(str(path)) and key in str(err.value), err.value


def test_return_background_and_the_other_data_options_are_settable_from_the_config(tmp_path, demo_data):
    cfg = load_train_config(_config(tmp_path, demo_data, "return_background: true", "return_foreground: true",
                                    "subject_size: [16, 24]", "max_subjects_per_sample: 2"))
    ds = opens2v_dataset(cfg)
    assert ds.options.section is cfg.opens2v and ds.options.seed == 7 and ds.options.height == 32
    sample = ds[0]
    assert sample["background_image"].shape == sample["foreground_image"].shape == (3, 32, 48)
    assert sample["subject_images"].shape[1:] == (3, 16, 24)
    assert "background_image" not in opens2v_dataset(load_train_config(_config(tmp_path, demo_data)))[0]


def test_return_background_without_background_paths_is_a_config_error():
    with pytest.raises(ConfigError, match="background_base_paths"):
        OpenS2VSection(json_paths=["a.json"], video_base_paths=["v"], return_background=True)


def test_flat_keyword_options_split_into_the_section_and_the_run_level_keys():
    opts = DatasetOptions.build(height=64, width=96, seed=3, subject_selection="random", return_background=True)
    assert (opts.height, opts.width, opts.seed) == (64, 96, 3)
    assert opts.section.subject_selection == "random" and opts.section.return_background
    assert opts.reference_size == (64, 96)
