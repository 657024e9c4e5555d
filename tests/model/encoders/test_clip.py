"""CLIP vision wrapper: converter from the official layout, numerics against a float64 reference
of Wan's ViT written from its math, penultimate-block selection, preprocessing, loading."""
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel

from model.encoders.clip import (
    CLIP_DIM,
    CLIP_MEAN,
    CLIP_STD,
    CLIP_TOKENS,
    WanCLIPEncoder,
    clip_vision_config,
    convert_wan_clip_visual_state_dict,
    preprocess_images,
    tiny_clip_config,
)
from tests.kernels.tolerance import FP32_VS_FP64
from tests.model.encoders.official_layouts import wan_clip_state_dict

HEADS, LAYERS, PATCH, SIZE = 4, 3, 14, 28  # as in tiny_clip_config()


def vit_reference(sd: dict, pixels: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """Wan's ViT up to (not including) its last block, float64, from official-layout weights.

    pixels: [B, 3, S, S] already normalised; returns [B, L, C]. Bias-free patch conv, class
    token first, + pos, pre-norm LayerNorm; blocks x += attn(norm1 x), x += mlp(norm2 x) with
    exact GELU and q/k/v the row thirds of `to_qkv`; no post-norm.
    """
    w = {k[len("visual."):]: v.double() for k, v in sd.items() if k.startswith("visual.")}
    b = pixels.shape[0]
    x = F.conv2d(pixels.double(), w["patch_embedding.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([w["cls_embedding"].expand(b, -1, -1), x], dim=1) + w["pos_embedding"]
    c = x.shape[-1]
    x = F.layer_norm(x, (c,), w["pre_norm.weight"], w["pre_norm.bias"], eps=1e-5)
    num_blocks = len({k.split(".")[1] for k in w if k.startswith("transformer.")})
    for i in range(num_blocks - 1):
        p = f"transformer.{i}."
        h = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-5)
        qkv = h @ w[p + "attn.to_qkv.weight"].T + w[p + "attn.to_qkv.bias"]
        q, k, v = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) / (c // heads) ** 0.5).softmax(-1) @ v  # [B, N, L, D]
        x = x + attn.transpose(1, 2).reshape(b, -1, c) @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-5)
        h = F.gelu(h @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"])
        x = x + h @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"]
    return x


@pytest.fixture(scope="module")
def official_sd():
    return wan_clip_state_dict(seed=2)


@pytest.fixture(scope="module")
def encoder(official_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "models_clip_tiny.pth"
    torch.save(official_sd, path)
    return WanCLIPEncoder.from_official(path, dtype=torch.float32, config=tiny_clip_config())


def _cut_model(official_sd) -> CLIPVisionModel:
    model = CLIPVisionModel(tiny_clip_config(num_hidden_layers=LAYERS - 1)).eval()
    model.load_state_dict(convert_wan_clip_visual_state_dict(official_sd), strict=True)
    return model


def test_vit_h_config_gives_257_tokens_of_1280():
    cfg = clip_vision_config()
    assert 1 + (cfg.image_size // cfg.patch_size) ** 2 == CLIP_TOKENS == 257
    assert cfg.hidden_size == CLIP_DIM == 1280 and cfg.intermediate_size == 5120
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_act) == (32, 16, "gelu")


def test_converter_loads_strictly(official_sd):
    full = CLIPVisionModel(tiny_clip_config())
    converted = convert_wan_clip_visual_state_dict(official_sd, drop_last_block=False)
    assert set(converted) == set(full.state_dict())
    full.load_state_dict(converted, strict=True)
    cut = convert_wan_clip_visual_state_dict(official_sd)
    assert set(cut) == set(CLIPVisionModel(tiny_clip_config(num_hidden_layers=LAYERS - 1)).state_dict())
    qkv = official_sd["visual.transformer.1.attn.to_qkv.weight"]
    assert torch.equal(cut["encoder.layers.1.self_attn.k_proj.weight"], qkv[32:64])
    assert torch.equal(cut["embeddings.class_embedding"], official_sd["visual.cls_embedding"][0, 0])


def test_converter_names_bad_keys(official_sd):
    with pytest.raises(ValueError, match="visual.transformer.0.attn.q.weight"):
        bad = {**official_sd, "visual.transformer.0.attn.q.weight": torch.zeros(1)}
        convert_wan_clip_visual_state_dict(bad)
    partial = {k: v for k, v in official_sd.items() if k != "visual.transformer.2.mlp.0.bias"}
    with pytest.raises(ValueError, match="visual.transformer.2.mlp.0.bias"):
        convert_wan_clip_visual_state_dict(partial)


def test_matches_float64_reference(official_sd):
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = _cut_model(official_sd)(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours.double(), vit_reference(official_sd, pixels), **FP32_VS_FP64)


def test_cut_model_is_the_full_models_penultimate_block(official_sd):
    full = CLIPVisionModel(tiny_clip_config()).eval()
    full.load_state_dict(convert_wan_clip_visual_state_dict(official_sd, drop_last_block=False))
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        states = full(pixel_values=pixels, output_hidden_states=True).hidden_states
        cut = _cut_model(official_sd)(pixel_values=pixels).last_hidden_state
    assert len(states) == LAYERS + 1
    torch.testing.assert_close(cut, states[-2], rtol=0, atol=1e-6)
    assert not torch.allclose(cut, states[-1])


def test_preprocessing_resizes_and_normalises():
    flat = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 45, 61)
    out = preprocess_images(flat, image_size=SIZE)
    assert out.shape == (1, 3, SIZE, SIZE)
    expected = (torch.tensor([0.0, 0.5, 1.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out))
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1  # already S x S: the resize is the identity
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess_images(images, SIZE), (images * 0.5 + 0.5 - mean) / std)
    big = torch.rand(1, 3, 45, 61) * 2 - 1
    for mode, same in (("bicubic", True), ("bilinear", False)):
        resized = F.interpolate(big, size=(SIZE, SIZE), mode=mode, align_corners=False)
        assert torch.allclose(preprocess_images(big, SIZE), (resized * 0.5 + 0.5 - mean) / std) is same


def test_encode_shapes_and_numerics(encoder, official_sd):
    images = torch.rand(3, 3, 45, 61) * 2 - 1
    tokens = encoder.encode(images)
    assert tokens.shape == (3, 1 + (SIZE // PATCH) ** 2, 32) and tokens.dtype == torch.float32
    ref = vit_reference(official_sd, preprocess_images(images, SIZE))
    torch.testing.assert_close(tokens.double(), ref, **FP32_VS_FP64)


def test_frozen_and_no_grad(encoder):
    encoder.train()
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.enable_grad():
        assert not encoder.encode(torch.zeros(1, 3, SIZE, SIZE)).requires_grad


def test_from_hf_dir_skips_the_last_block(official_sd, encoder, tmp_path):
    full = CLIPVisionModel(tiny_clip_config())
    full.load_state_dict(convert_wan_clip_visual_state_dict(official_sd, drop_last_block=False))
    full.save_pretrained(tmp_path / "full")
    loaded = WanCLIPEncoder.from_hf_dir(tmp_path / "full", dtype=torch.float32)
    assert loaded.model.config.num_hidden_layers == LAYERS - 1
    images = torch.rand(2, 3, 30, 30) * 2 - 1
    torch.testing.assert_close(loaded.encode(images), encoder.encode(images), rtol=0, atol=0)
