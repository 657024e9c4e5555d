"""The demo's colour VAE (ds_trainer/demo_vae.py): a real diffusers AutoencoderKLWan, loaded by the
same code as the official VAE, whose latents are the clips' whitened block colours spread over all
16 channels and whose decoder gives the block average back."""
import pytest
import torch
from diffusers import AutoencoderKLWan

from ds_trainer.demo_vae import block_average, build_colour_vae, latent_embedding
from model.encoders.vae import WanVAE, tiny_vae_config


def _clips(n: int, frames: int = 9, height: int = 32, width: int = 48) -> list[torch.Tensor]:
    """Smooth random videos in [-1, 1] with a moving bright square: [1, 3, T, H, W] each."""
    g = torch.Generator().manual_seed(0)
    clips = []
    for i in range(n):
        base = torch.rand(1, 3, 1, 4, 6, generator=g) * 1.6 - 0.8
        video = torch.nn.functional.interpolate(base, size=(frames, height, width), mode="trilinear").clone()
        for t in range(frames):
            video[0, :, t, 8:20, 4 + 3 * t + i:16 + 3 * t + i] = torch.tensor([0.9, -0.7, 0.2 * i - 0.5])[:, None, None]
        clips.append(video)
    return clips


@pytest.fixture(scope="module")
def colour_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour_vae")
    torch.manual_seed(0)
    AutoencoderKLWan(**tiny_vae_config()).save_pretrained(str(root / "vae"))  # random, as the demo writes it
    clips = _clips(4)
    stats = build_colour_vae(root / "vae", clips)
    return WanVAE.from_hf_dir(root / "vae"), clips, stats


def test_decode_of_encode_is_the_block_average(colour_vae):
    vae, clips, _ = colour_vae
    video = torch.cat(clips)
    with torch.no_grad():
        out = vae.decode(vae.encode(video))
    expected = block_average(video)
    assert out.shape == video.shape
    assert (out - expected).abs().max() < 1e-3
    # and the block average really is coarse: the moving square's edges are not kept
    assert ((expected - video) ** 2).mean() > 1e-3


def test_a_single_image_round_trips_too(colour_vae):
    vae, clips, _ = colour_vae
    image = clips[1][:, :, :1]
    with torch.no_grad():
        out = vae.decode(vae.encode(image))
    assert (out - block_average(image)).abs().max() < 1e-3


def _colours_of(z: torch.Tensor) -> torch.Tensor:
    """Normalised latents [N, 16, ...] -> the whitened colours [3, cells] they embed."""
    return torch.linalg.pinv(latent_embedding(16)) @ z.double().transpose(0, 1).reshape(16, -1)


def test_latents_are_whitened_colours_spread_over_every_channel(colour_vae):
    vae, clips, stats = colour_vae
    with torch.no_grad():
        z = vae.encode(torch.cat(clips)).double()            # [N, 16, F, h, w]
    colours = _colours_of(z)
    assert colours.mean(1).abs().max() < 1e-4
    cov = torch.cov(colours, correction=0)
    assert (cov - torch.eye(3, dtype=cov.dtype)).abs().max() < 1e-3
    flat = z.transpose(0, 1).reshape(16, -1)
    assert (latent_embedding(16) @ colours - flat).abs().max() < 1e-4  # nothing outside the 3-d span
    assert flat.var(1, unbiased=False).mean() == pytest.approx(1.0, abs=1e-3)  # unit variance on average
    assert (flat.var(1) > 0.01).all()  # and every channel carries some of it
    assert len(stats["colour_mean"]) == 3 and min(stats["colour_std"]) > 0


def test_latents_follow_the_colour_of_each_cell(colour_vae):
    """A redder frame moves every cell's latent by the same vector: an affine map of the colour."""
    vae, clips, _ = colour_vae
    flat = torch.zeros(2, 3, 1, 32, 48)
    flat[1, 0] = 0.5
    with torch.no_grad():
        z = vae.encode(flat)
    diff = (z[1] - z[0]).flatten(1)                            # [16, cells]: the same at every cell
    assert (diff - diff[:, :1]).abs().max() < 1e-4 and diff.abs().max() > 0.1
    with torch.no_grad():
        back = vae.decode(z)
    assert (back[1, 0] - 0.5).abs().max() < 1e-3 and (back[1, 1:]).abs().max() < 1e-3
