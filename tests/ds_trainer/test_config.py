"""Run configs: every value is checked at load, and an error names the file and the dotted key."""
import textwrap

import pytest

from ds_trainer.config import JOBS, TrainConfig, load_train_config
from model.config import ConfigError, WanConfig

# The OpenS2V seed's configuration blocks, as printed in the seed (../shared/seeds/000_*.txt),
# with the encoder paths it leaves to the trainer added.
SEED_YAML = """
opens2v:
  json_paths:
    - "/path/to/OpenS2V/demo_result/step5/merge_final_json/dataset1.json"
  video_base_paths:
    - "/path/to/OpenS2V/demo_result/step0/videos/dataset1"
  background_base_paths:
    - "/path/to/OpenS2V/demo_result/step5/final_output/dataset1/foreground"
  sample_stride: 3
  max_subjects_per_sample: 1
  subject_selection: "first"
is_cross_frame: false
generator_ckpt: "/path/to/dual_crossattn_checkpoint.pt"

num_training_frames: 21
pixel_height: 480
pixel_width: 832

lr: 1.0e-4
gradient_accumulation_steps: 1
max_grad_norm: 1.0

max_iters: 10000
log_iters: 500
batch_size: 1

adapter:
  adapter_type: "lora"
  r: 64
  lora_alpha: 64
  lora_dropout: 0.0
  target_modules: ["to_q", "to_k", "to_v", "to_out"]

encoders:
  t5: /path/to/models_t5_umt5-xxl-enc-bf16.pth
  clip: /path/to/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
  vae: /path/to/Wan2.1_VAE.pth
"""

MINIMAL = """
cache_dir: /somewhere/cache
model: {preset: tiny}
"""


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_seeds_own_config_loads(tmp_path):
    cfg = load_train_config(_write(tmp_path, SEED_YAML))
    assert isinstance(cfg, TrainConfig) and cfg.job == "opens2v-adapters"
    assert (cfg.height, cfg.width, cfg.num_training_frames) == (480, 832, 21)
    assert cfg.adapter.r == 64 and cfg.opens2v.subject_selection == "first"


def test_a_seed_alias_and_its_name_together_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="pixel_height and height"):
        load_train_config(_write(tmp_path, SEED_YAML + "height: 480\n"))


@pytest.mark.parametrize("line, key", [
    ("opens2v: {subject_selection: frist}", "opens2v.subject_selection"),
    ("opens2v: {sample_strid: 3}", "opens2v.sample_strid"),
    ("opens2v: {max_subjects_per_sample: 0}", "opens2v.max_subjects_per_sample"),
    ("model: {preset: tiny, overrides: {num_layers: two}}", "model.overrides"),
    ("model: {preset: tiny, overrides: {num_layer: 2}}", "model.overrides"),
    ("model: {preset: huge}", "model.preset"),
    ("adapter: {r: 0}", "adapter.r"),
    ("adapter: {adapter_type: dora}", "adapter.adapter_type"),
    ("wandb: {mode: onlin}", "wandb.mode"),
    ("sample: {steps: 0}", "sample.steps"),
    ("sample: {ref_guidance: -1}", "sample.ref_guidance"),
    ("sample: {enabled: true}", "sample.enabled"),
    ("encoders: {t5: a, vae: b, clip: c, dtype: fp8}", "encoders.dtype"),
    ("zero: '4'", "zero"),
    ("job: dmdd", "job"),
    ("lr: -1", "lr"),
    ("batch_size: 0", "batch_size"),
    ("keep_last_checkpoints: -1", "keep_last_checkpoints"),
    ("height: 100", "height"),
    ("deepspeed_config: /no/such/ds.json", "deepspeed_config"),
    ("max_grad_norm: -1", "max_grad_norm"),
    ("warmup_steps: -5", "warmup_steps"),
    ("height: 0", "height"),
    ("width: -16", "height"),
    ("lr: .nan", "lr"),
    ("lr: .inf", "lr"),
    ("timestep_shift: -2", "timestep_shift"),
    ("num_workers: -1", "num_workers"),
    ("weight_decay: -0.1", "weight_decay"),
    ("adapter: {lora_dropout: .nan}", "adapter.lora_dropout"),
    ("lr: 1\nlr: 2", "'lr' appears twice"),
    ("model: {preset: tiny, preset: tiny}", "'preset' appears twice"),
])
def test_a_bad_value_anywhere_is_an_error_at_load_naming_file_and_key(tmp_path, line, key):
    """Also with cache_dir set (the data section is then not used for training, but still checked)."""
    base = MINIMAL if not line.startswith("model:") else MINIMAL.replace("model: {preset: tiny}", "")
    path = _write(tmp_path, base + line + "\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    message = str(err.value)
    assert message.startswith(str(path)) and key in message, message


def test_a_clip_path_without_a_clip_encoder_is_an_error_at_load(tmp_path):
    path = _write(tmp_path, "opens2v: {json_paths: [a.json], video_base_paths: [v]}\n"
                            "encoders: {t5: t, vae: v}\nmodel: {preset: tiny}\n")
    with pytest.raises(ConfigError, match="encoders.clip"):
        load_train_config(path)
    assert load_train_config(path, {"train_clip_path": False}).train_clip_path is False


def test_set_overrides_are_checked_like_the_file(tmp_path):
    path = _write(tmp_path, MINIMAL)
    assert load_train_config(path, {"opens2v.sample_stride": 2}).opens2v.sample_stride == 2
    with pytest.raises(ConfigError, match="opens2v.subject_selection"):
        load_train_config(path, {"opens2v.subject_selection": "frist"})
    with pytest.raises(ConfigError, match="cache_dir is not a section"):
        load_train_config(path, {"cache_dir.b.c": 1})


def test_wan_config_json_loads_through_the_same_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"_class_name": "WanModel", "dim": 64, "ffn_dim": 128, "num_heads": "2"}')
    with pytest.raises(ConfigError, match=r"config.json: num_heads: expected int"):
        WanConfig.from_json(path)
    path.write_text('{"dim": 64, "ffn_dim": 128, "num_heads": 3}')
    with pytest.raises(ConfigError, match=r"config.json: num_heads: dim \(64\) must be divisible"):
        WanConfig.from_json(path)


def _sections(cls, seen):
    """`cls` and every dataclass its fields hold (Optional / list members included)."""
    import dataclasses
    import typing
    if cls in seen:
        return
    seen.append(cls)
    for tp in typing.get_type_hints(cls).values():
        for arg in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(arg):
                _sections(arg, seen)


def _undocumented_fields(cls) -> list[str]:
    import ast
    import dataclasses
    import inspect
    names = {f.name for f in dataclasses.fields(cls)}
    out = []
    for klass in (k for k in cls.__mro__ if dataclasses.is_dataclass(k)):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names:
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    out.append(f"{klass.__name__}.{node.target.id}")
    return out


def test_every_field_of_every_section_has_a_docstring():
    sections = []
    _sections(TrainConfig, sections)
    _sections(WanConfig, sections)
    assert len(sections) >= 8, sections  # run, opens2v, model, encoders, adapter, wandb, sample, wan, refs
    assert sorted(f for cls in sections for f in _undocumented_fields(cls)) == []


def test_every_job_names_its_config_and_trainer_and_the_trainer_its_job():
    import dataclasses

    from ds_trainer.config import _import
    for job, (config_spec, trainer_spec) in JOBS.items():
        trainer = _import(trainer_spec)
        assert trainer.name == job and trainer.checkpoint_prefix
        defaults = {f.name: f.default for f in dataclasses.fields(_import(config_spec))}
        assert defaults["job"] == job


def test_the_readmes_data_options_can_be_set_from_the_training_yaml(tmp_path):
    cfg = load_train_config(_write(tmp_path, MINIMAL + "opens2v: {image_policy: skip, max_bad_fraction: 0.5}\n"))
    assert (cfg.opens2v.image_policy, cfg.opens2v.max_bad_fraction) == ("skip", 0.5)
    with pytest.raises(ConfigError, match="opens2v.max_bad_fraction"):
        load_train_config(_write(tmp_path, MINIMAL + "opens2v: {max_bad_fraction: 1.5}\n", "bad.yaml"))
