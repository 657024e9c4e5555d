"""umT5 encoder wrapper: converter from the official layout, numerics against a float64
reference of Wan's T5 encoder written from its math, tokenisation, padding and truncation."""
import io
import math

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, T5Tokenizer, UMT5EncoderModel

from model.encoders.t5 import (
    T5_TOKENS,
    WanT5Encoder,
    clean_prompt,
    convert_wan_t5_state_dict,
    tiny_umt5_config,
    umt5_config,
)
from tests.kernels.tolerance import FP32_VS_FP64
from tests.model.encoders.official_layouts import wan_t5_state_dict

VOCAB = 64  # >= the tiny tokenizer's 40 pieces
HEADS = 4
SENTENCES = [
    "a cat sits on the mat",
    "the quick brown fox jumps over the lazy dog",
    "a video of a dog running in the park",
    "two people walk along the beach at sunset",
]


def _bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 relative-position buckets: half the buckets per sign of (key - query);
    distances below a quarter of the buckets are exact, then log-spaced up to max_distance."""
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_bucket = exact + (
        torch.log(dist.double().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
    ).long()
    return (rel > 0).long() * half + torch.where(dist < exact, dist, log_bucket.clamp(max=half - 1))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def t5_reference(sd: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """Wan's T5 encoder in float64 from official-layout weights.

    ids, mask: [B, L]; returns [B, L, C]. Pre-RMSNorm blocks; attention WITHOUT 1/sqrt(d),
    plus a per-layer relative bias; masked keys get -inf; FFN = fc2(fc1(x) * gelu_tanh(gate(x))).
    """
    w = {k: v.double() for k, v in sd.items()}
    x = w["token_embedding.weight"][ids]  # [B, L, C]
    b, length, c = x.shape
    pos = torch.arange(length)
    buckets = _bucket(pos[None, :] - pos[:, None])  # [Lq, Lk]
    key_ok = mask.bool()[:, None, None, :]  # [B, 1, 1, Lk]
    for i in range(len({k.split(".")[1] for k in w if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        h = _rms(x, w[p + "norm1.weight"])
        q, k, v = (
            (h @ w[p + f"attn.{n}.weight"].T).view(b, length, heads, -1).transpose(1, 2) for n in "qkv"
        )  # [B, N, L, D]
        bias = w[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # [N, Lq, Lk]
        scores = (q @ k.transpose(-1, -2) + bias).masked_fill(~key_ok, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, -1)
        x = x + out @ w[p + "attn.o.weight"].T
        h = _rms(x, w[p + "norm2.weight"])
        gate = F.gelu(h @ w[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ w[p + "ffn.fc1.weight"].T) * gate) @ w[p + "ffn.fc2.weight"].T
    return _rms(x, w["norm.weight"])


@pytest.fixture(scope="module")
def official_sd():
    return wan_t5_state_dict(seed=1, vocab=VOCAB, num_heads=HEADS)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A transformers T5 tokenizer dir from a sentencepiece unigram model trained here."""
    root = tmp_path_factory.mktemp("t5tok")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 5), model_writer=proto, vocab_size=40,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    (root / "spiece.model").write_bytes(proto.getvalue())
    T5Tokenizer.from_pretrained(str(root), extra_ids=0).save_pretrained(str(root / "tok"))
    return root / "tok"


@pytest.fixture(scope="module")
def encoder(official_sd, tokenizer_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("t5ckpt") / "models_t5_tiny.pth"
    torch.save(official_sd, path)
    return WanT5Encoder.from_official(path, tokenizer_dir, dtype=torch.float32,
                                      config=tiny_umt5_config(vocab_size=VOCAB))


def test_xxl_config_matches_wan():
    cfg = umt5_config()
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers) == (
        256384, 4096, 10240, 64, 64, 24)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and cfg.layer_norm_epsilon == 1e-6


def test_converter_loads_strictly(official_sd):
    model = UMT5EncoderModel(tiny_umt5_config(vocab_size=VOCAB))
    converted = convert_wan_t5_state_dict(official_sd)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    gate = converted["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    assert gate is official_sd["blocks.1.ffn.gate.0.weight"]  # mapped, not copied


def test_converter_names_bad_keys(official_sd):
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        convert_wan_t5_state_dict({**official_sd, "blocks.0.attn.qkv.weight": torch.zeros(1)})
    partial = {k: v for k, v in official_sd.items() if k != "blocks.1.norm2.weight"}
    with pytest.raises(ValueError, match="blocks.1.norm2.weight"):
        convert_wan_t5_state_dict(partial)


def test_from_official_rejects_a_config_that_does_not_fit(official_sd, tokenizer_dir, tmp_path):
    torch.save(official_sd, tmp_path / "t5.pth")
    with pytest.raises(ValueError, match="encoder.block.2"):
        WanT5Encoder.from_official(tmp_path / "t5.pth", tokenizer_dir, dtype=torch.float32,
                                   config=tiny_umt5_config(vocab_size=VOCAB, num_layers=3))


def test_matches_float64_reference(official_sd):
    model = UMT5EncoderModel(tiny_umt5_config(vocab_size=VOCAB)).eval()
    model.load_state_dict(convert_wan_t5_state_dict(official_sd), strict=True)
    lens = torch.tensor([157, 59, 1])  # beyond the 128 max distance, and a single token
    ids = torch.randint(3, VOCAB, (3, 157))
    mask = (torch.arange(157)[None] < lens[:, None]).long()
    with torch.no_grad():
        ours = model(input_ids=ids * mask, attention_mask=mask).last_hidden_state
    ref = t5_reference(official_sd, ids * mask, mask)
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(ours[i, :n].double(), ref[i, :n], **FP32_VS_FP64)


def test_encode_zero_pads_and_counts_tokens(encoder):
    prompts = ["a cat", "  the quick brown   fox jumps over the lazy dog\n"]
    context, lens = encoder.encode(prompts)
    assert context.shape == (2, T5_TOKENS, 32) and context.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(encoder.tokenizer.name_or_path, local_files_only=True)
    expected = [len(tok(clean_prompt(p)).input_ids) for p in prompts]
    assert lens.tolist() == expected and expected[0] < expected[1]
    for i, n in enumerate(expected):
        assert torch.all(context[i, n:] == 0)
        assert torch.all(context[i, :n].abs().sum(-1) > 0)
        # Wan keeps u[:len] of a masked batch: the same as encoding the prompt alone.
        alone = tok(clean_prompt(prompts[i]), return_tensors="pt").input_ids
        with torch.no_grad():
            ref = encoder.model(input_ids=alone).last_hidden_state[0]
        torch.testing.assert_close(context[i, :n], ref, rtol=1e-5, atol=1e-5)


def test_encode_truncates_to_512(encoder):
    context, lens = encoder.encode(["the dog runs " * 300, "a cat"])
    assert context.shape == (2, T5_TOKENS, 32)
    assert lens[0].item() == T5_TOKENS and torch.all(context[0].abs().sum(-1) > 0)


def test_frozen_and_no_grad(encoder):
    encoder.train()
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.enable_grad():
        context, _ = encoder.encode(["a cat"])
    assert not context.requires_grad


def test_clean_prompt():
    assert clean_prompt("  a\t&amp;amp; b \n c ") == "a & b c"


def test_from_hf_dir_matches_from_official(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path / "umt5")
    loaded = WanT5Encoder.from_hf_dir(tmp_path / "umt5", encoder.tokenizer.name_or_path, dtype=torch.float32)
    prompts = ["a dog in the park", "a cat"]
    for ours, ref in zip(loaded.encode(prompts), encoder.encode(prompts)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
