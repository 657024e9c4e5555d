"""Wan VAE wrapper: converter from the official layout (checked key by key), latent shapes for
images and videos, Wan's per-channel normalisation, decode, and input checks."""
import pytest
import torch
from diffusers import AutoencoderKLWan

from model.encoders.vae import (
    VAE_Z_DIM,
    WAN_VAE_LATENT_MEAN,
    WAN_VAE_LATENT_STD,
    WanVAE,
    convert_wan_vae_state_dict,
    tiny_vae_config,
    wan_vae_config,
)
from tests.model.encoders.official_layouts import wan_vae_layout, wan_vae_state_dict

MEAN = torch.tensor(WAN_VAE_LATENT_MEAN).view(1, VAE_Z_DIM, 1, 1, 1)
STD = torch.tensor(WAN_VAE_LATENT_STD).view(1, VAE_Z_DIM, 1, 1, 1)


@pytest.fixture(scope="module")
def official_sd():
    return wan_vae_state_dict(seed=3, dim=tiny_vae_config()["base_dim"])


@pytest.fixture(scope="module")
def vae(official_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE_tiny.pth"
    torch.save(official_sd, path)
    return WanVAE.from_official(path, config=tiny_vae_config())


def _video(b: int, t: int, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(t)) * 2 - 1


def test_official_config():
    cfg = wan_vae_config()
    assert (cfg["base_dim"], cfg["z_dim"], cfg["num_res_blocks"]) == (96, 16, 2)
    assert cfg["dim_mult"] == [1, 2, 4, 4] and cfg["attn_scales"] == []
    assert cfg["temperal_downsample"] == [False, True, True]
    assert len(WAN_VAE_LATENT_MEAN) == len(WAN_VAE_LATENT_STD) == VAE_Z_DIM


def test_full_size_layout_converts_onto_the_full_model():
    meta = {k: torch.empty(s, device="meta") for k, s in wan_vae_layout(dim=96)}
    converted = convert_wan_vae_state_dict(meta)  # raises on any key or shape mismatch
    assert len(converted) == len(meta)


def test_converter_loads_strictly(official_sd):
    converted = convert_wan_vae_state_dict(official_sd, tiny_vae_config())
    AutoencoderKLWan(**tiny_vae_config()).load_state_dict(converted, strict=True)
    assert converted["quant_conv.weight"] is official_sd["conv1.weight"]


def test_converter_names_bad_keys(official_sd):
    with pytest.raises(ValueError, match="encoder.extra.weight"):
        convert_wan_vae_state_dict({**official_sd, "encoder.extra.weight": torch.zeros(1)}, tiny_vae_config())
    partial = {k: v for k, v in official_sd.items() if k != "decoder.head.2.bias"}
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        convert_wan_vae_state_dict(partial, tiny_vae_config())
    with pytest.raises(ValueError, match="wrong shapes"):
        convert_wan_vae_state_dict(official_sd, tiny_vae_config(base_dim=16))


@pytest.mark.parametrize("frames, latent_frames", [(1, 1), (5, 2), (9, 3)])
def test_encode_shapes(vae, frames, latent_frames):
    latents = vae.encode(_video(2, frames))
    assert latents.shape == (2, VAE_Z_DIM, latent_frames, 2, 2) and latents.dtype == torch.float32


def test_encode_is_normalised_posterior_mean(vae):
    video = _video(1, 5, 16, 24)
    with torch.no_grad():
        mu = vae.model.encode(video).latent_dist.mean  # raw diffusers posterior mean
    torch.testing.assert_close(vae.encode(video), (mu - MEAN) / STD, rtol=0, atol=1e-6)
    torch.testing.assert_close(vae.encode(video), vae.encode(video), rtol=0, atol=0)  # no sampling


def test_decode_denormalises_and_clamps(vae):
    video = _video(1, 5)
    latents = vae.encode(video)
    decoded = vae.decode(latents * 20)  # large latents push pixels past [-1, 1]
    assert decoded.shape == video.shape
    assert decoded.min() >= -1 and decoded.max() <= 1 and (decoded.abs() == 1).any()
    with torch.no_grad():
        raw = vae.model.decode(latents * STD + MEAN).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(latents), raw, rtol=0, atol=1e-6)


def test_frozen_and_no_grad(vae):
    vae.train()
    assert not vae.model.training
    assert not any(p.requires_grad for p in vae.parameters())
    with torch.enable_grad():
        assert not vae.encode(_video(1, 1)).requires_grad


@pytest.mark.parametrize("shape", [(1, 3, 4, 16, 16), (1, 3, 1, 12, 16), (1, 4, 1, 16, 16), (3, 16, 16)])
def test_rejects_bad_video_shapes(vae, shape):
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(shape))


def test_from_hf_dir_matches_from_official(vae, tmp_path):
    vae.model.save_pretrained(tmp_path / "vae")
    loaded = WanVAE.from_hf_dir(tmp_path / "vae")
    video = _video(1, 5)
    torch.testing.assert_close(loaded.encode(video), vae.encode(video), rtol=0, atol=0)
