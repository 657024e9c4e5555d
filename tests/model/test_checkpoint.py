"""Every checkpoint format loads into a meta-built model; bad keys fail naming the key."""
import json

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, load_wan_model, save_diffusers_dir
from model.conditioning import Conditioning
from model.config import ReferencePathsConfig, WAN_TINY, WAN_TINY_I2V
from model.wan import WanModel


@pytest.fixture(scope="module")
def tiny_i2v():
    torch.manual_seed(0)
    model = WanModel(WAN_TINY_I2V)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _write(fmt, model, tmp_path):
    sd = model.state_dict()
    if fmt == "diffusers":
        return save_diffusers_dir(model, model.config, tmp_path / "dir")
    if fmt == "diffusers-sharded":
        out = save_diffusers_dir(model, model.config, tmp_path / "dir", max_shard_bytes=400_000)
        assert len(list(out.glob("*-of-*.safetensors"))) > 1
        return out
    if fmt == "safetensors":
        save_file(sd, str(tmp_path / "w.safetensors"))
        return tmp_path / "w.safetensors"
    if fmt == "pt":
        torch.save(sd, tmp_path / "w.pt")
        return tmp_path / "w.pt"
    if fmt == "self-forcing":  # {"generator": {"model.<key>": ...}, "critic": ...}
        torch.save({"generator": {f"model.{k}": v for k, v in sd.items()},
                    "critic": {"model.x": torch.zeros(1)}}, tmp_path / "sf.pt")
        return tmp_path / "sf.pt"
    raise AssertionError(fmt)


FORMATS = ["diffusers", "diffusers-sharded", "safetensors", "pt", "self-forcing"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(fmt, tiny_i2v, tmp_path):
    path = _write(fmt, tiny_i2v, tmp_path)
    config = None if fmt.startswith("diffusers") else WAN_TINY_I2V  # tiny head dim: shapes cannot tell
    loaded, report = load_wan_model(path, config=config)
    _same_weights(loaded, tiny_i2v)
    assert report.loaded == len(tiny_i2v.state_dict()) and not report.initialised
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    if fmt == "self-forcing":
        assert report.entry == "generator" and report.dropped_prefix == "model."
    x = torch.randn(1, 16, 2, 4, 4)
    kw = dict(clip_fea=torch.randn(1, 257, 40), y=torch.randn(1, 20, 2, 4, 4))
    torch.testing.assert_close(loaded(x, torch.tensor([3.0]), Conditioning(torch.randn(1, 5, 48), **kw)).shape, x.shape)


def test_diffusers_config_json_drives_the_architecture(tiny_i2v, tmp_path):
    out = save_diffusers_dir(tiny_i2v, WAN_TINY_I2V, tmp_path / "d")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel" and "patch_size" not in cfg  # omitted, as upstream
    loaded, _ = load_wan_model(out)
    assert loaded.config.model_type == "i2v" and loaded.config.num_heads == 2


def test_generator_ema_is_chosen_on_request(tiny_i2v, tmp_path):
    sd = tiny_i2v.state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"generator": sd, "generator_ema": ema}, tmp_path / "c.pt")
    loaded, report = load_wan_model(tmp_path / "c.pt", config=WAN_TINY_I2V, use_ema=True)
    assert report.entry == "generator_ema"
    assert torch.equal(loaded.head.head.weight, ema["head.head.weight"])


def test_shapes_infer_the_config_when_head_dim_is_128(tmp_path):
    cfg = WAN_TINY.replace(dim=256, num_heads=2, ffn_dim=64)
    model = WanModel(cfg)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded, _ = load_wan_model(tmp_path / "w.safetensors")
    assert (loaded.config.dim, loaded.config.num_heads, loaded.config.ffn_dim, loaded.config.num_layers) == (256, 2, 64, 2)


def test_reference_adapters_may_be_missing_and_are_initialised(tiny_i2v, tmp_path):
    base = WanModel(WAN_TINY)
    save_file(base.state_dict(), str(tmp_path / "w.safetensors"))
    refs = ReferencePathsConfig(clip=True, vae=True, fused=True)
    loaded, report = load_wan_model(tmp_path / "w.safetensors", config=WAN_TINY, reference_paths=refs)
    assert "vae_proj.weight" in report.initialised and "blocks.1.cross_attn.k_img.weight" in report.initialised
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.count_nonzero(loaded.blocks[0].cross_attn.v_vae.weight) == 0
    assert torch.count_nonzero(loaded.blocks[0].cross_attn.k_vae.weight) > 0


def test_missing_base_key_is_an_error_naming_it(tmp_path):
    sd = WanModel(WAN_TINY).state_dict()
    del sd["blocks.1.ffn.2.bias"]
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.ffn\.2\.bias'"):
        load_wan_model(tmp_path / "w.safetensors", config=WAN_TINY)


def test_misshaped_key_is_an_error_naming_it(tmp_path):
    sd = WanModel(WAN_TINY).state_dict()
    sd["blocks.0.self_attn.q.weight"] = torch.zeros(64, 63)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.self_attn\.q\.weight' has shape \(64, 63\)"):
        load_wan_model(tmp_path / "w.pt", config=WAN_TINY)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    sd = WanModel(WAN_TINY).state_dict()
    sd["blocks.0.cross_attn.k_mystery.weight"] = torch.zeros(64, 64)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks\.0\.cross_attn\.k_mystery\.weight'"):
        load_wan_model(tmp_path / "w.safetensors", config=WAN_TINY)


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_wan_model(tmp_path / "trunc.safetensors", config=WAN_TINY)
    torch.save({"generator_lora": {"a": torch.zeros(1)}, "step": torch.tensor(3)}, tmp_path / "lora.pt")
    with pytest.raises(CheckpointError, match="LoRA"):
        load_wan_model(tmp_path / "lora.pt", config=WAN_TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_wan_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such file"):
        load_wan_model(tmp_path / "nope.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")  # a state dict of something else
    with pytest.raises(CheckpointError, match="unexpected key 'x'"):
        load_wan_model(tmp_path / "other.pt", config=WAN_TINY)


class _Payload:
    """Any pickled object that is not a tensor container."""


def test_pickled_code_is_refused(tmp_path):
    torch.save({"generator": {"w": torch.zeros(1)}, "cfg": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_wan_model(tmp_path / "evil.pt", config=WAN_TINY)


def test_sharded_index_listing_a_missing_shard(tiny_i2v, tmp_path):
    out = save_diffusers_dir(tiny_i2v, WAN_TINY_I2V, tmp_path / "d", max_shard_bytes=400_000)
    next(out.glob("*-00001-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="listed but not present"):
        load_wan_model(out)
