"""The diffusers layout (`WanTransformer3DModel`) both ways, against diffusers itself: a folder
written by diffusers' `save_pretrained` loads into WanModel with the same outputs (float64), and
our export loads into diffusers' class with no missing or unexpected key and the same outputs.

Tolerance: diffusers builds the sinusoidal timestep embedding in float32 whatever the model's
dtype (`get_timestep_embedding`), so float64 runs agree to ~2e-6 on outputs of order 1; a wrong
rename (a swapped norm, a transposed projection) is off by O(1)."""
TOL = 1e-5
import pytest
import torch
from diffusers import WanTransformer3DModel

from model import diffusers_layout
from model.checkpoint import CheckpointError, load_wan_model, save_diffusers_dir
from model.conditioning import Conditioning
from model.config import WAN_TINY, WAN_TINY_I2V, ReferencePathsConfig
from model.wan import WanModel


def _diffusers_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{k: v for k, v in diffusers_layout.diffusers_config(cfg.to_dict()).items()
                                     if not k.startswith("_")})
    with torch.no_grad():  # diffusers zero-initialises nothing we rely on, but make every tensor non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.double().eval()


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([700.0], dtype=torch.float64)
    context = torch.zeros(1, cfg.text_len, cfg.text_dim, dtype=torch.float64)  # diffusers pads outside the model
    context[:, :7] = torch.randn(1, 7, cfg.text_dim, generator=g, dtype=torch.float64)
    cond = Conditioning(context=context)
    if cfg.model_type == "i2v":
        cond = cond.replace(clip_fea=torch.randn(1, 257, cfg.clip_dim, generator=g, dtype=torch.float64),
                            y=torch.randn(1, 20, 3, 4, 6, generator=g, dtype=torch.float64))
    return x, t, cond


def _diffusers_forward(model, x, t, cond):
    hidden = x if cond.y is None else torch.cat([x, cond.y], dim=1)
    return model(hidden_states=hidden, timestep=t, encoder_hidden_states=cond.context,
                 encoder_hidden_states_image=cond.clip_fea, return_dict=False)[0]


@pytest.mark.parametrize("cfg", [WAN_TINY, WAN_TINY_I2V], ids=["t2v", "i2v"])
def test_a_folder_written_by_diffusers_loads_with_the_same_outputs(cfg, tmp_path):
    theirs = _diffusers_model(cfg)
    theirs.save_pretrained(tmp_path / "transformer")
    ours, report = load_wan_model(tmp_path / "transformer", dtype=torch.float64)
    assert "WanTransformer3DModel names" in report.format and not report.initialised
    assert ours.config.model_type == cfg.model_type and ours.config.dim == cfg.dim
    x, t, cond = _inputs(cfg)
    with torch.no_grad():
        want = _diffusers_forward(theirs, x, t, cond)
        got = ours.eval()(x, t, cond)
    assert (got - want).abs().max().item() < TOL


@pytest.mark.parametrize("cfg", [WAN_TINY, WAN_TINY_I2V], ids=["t2v", "i2v"])
def test_our_export_loads_into_diffusers_with_the_same_outputs(cfg, tmp_path):
    torch.manual_seed(3)
    ours = WanModel(cfg).double().eval()
    save_diffusers_dir(ours, cfg, tmp_path / "out", layout="diffusers")
    theirs, info = WanTransformer3DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.float64,
                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x, t, cond = _inputs(cfg)
    with torch.no_grad():
        assert (_diffusers_forward(theirs.eval(), x, t, cond) - ours(x, t, cond)).abs().max().item() < TOL
    back, _ = load_wan_model(tmp_path / "out", dtype=torch.float64)  # and it reads back as it was written
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_every_key_maps_both_ways_one_to_one():
    for cfg in (WAN_TINY, WAN_TINY_I2V):
        keys = list(WanModel(cfg).state_dict())
        mapped = [diffusers_layout.diffusers_key(k) for k in keys]
        assert len(set(mapped)) == len(keys)
        assert [diffusers_layout.official_key(k) for k in mapped] == keys


def test_a_model_with_reference_adapters_is_not_exported_in_diffusers_layout(tmp_path):
    cfg = WAN_TINY.replace(reference_paths=ReferencePathsConfig(clip=True, vae=True))
    with pytest.raises(ValueError, match="no reference-adapter layers"):
        save_diffusers_dir(WanModel(cfg), cfg, tmp_path / "out", layout="diffusers")


def test_a_bad_diffusers_config_names_the_field(tmp_path):
    theirs = _diffusers_model(WAN_TINY)
    theirs.save_pretrained(tmp_path / "t")
    cfg_path = tmp_path / "t" / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"ffn_dim"', '"ffn_dimension"'))
    with pytest.raises(CheckpointError, match=r"config.json: a WanTransformer3DModel config needs field 'ffn_dim'"):
        load_wan_model(tmp_path / "t")
