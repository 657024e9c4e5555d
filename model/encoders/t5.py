"""umT5-XXL text encoder of Wan2.1, wrapped from transformers' `UMT5EncoderModel`.

Wan2.1 encodes a prompt with the encoder half of umT5-XXL (bias-free Linears, gated GELU-tanh
FFN, attention without 1/sqrt(d) scaling, a relative position bias per layer). transformers
implements the same network; this module maps the official single-file checkpoint
(`models_t5_umt5-xxl-enc-bf16.pth`) onto it and wraps tokenisation.

Shapes: B prompts, L = T5_TOKENS (512) tokens, C = T5_DIM (4096) channels.
Wan returns the un-padded rows `context[i, :lens[i]]` and the DiT zero-pads them back to 512;
`WanT5Encoder.encode` returns the zero-padded [B, L, C] directly, which is the same input.
"""
from __future__ import annotations

import html
import logging
import os
import re
from typing import Mapping, Sequence

import torch
from torch import nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from model.config import T5_DIM, T5_TOKENS  # prompts are padded / truncated to T5_TOKENS
from model.encoders.loading import check_loading_info

logger = logging.getLogger(__name__)


UMT5_XXL: Mapping[str, object] = dict(
    vocab_size=256384,
    d_model=T5_DIM,
    d_ff=10240,
    num_heads=64,
    d_kv=64,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",  # HF "gelu_new" = the tanh GELU Wan's T5 uses
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
)
"""transformers `UMT5Config` fields of Wan2.1's umT5-XXL encoder."""

# Official key (under `blocks.N.`) -> transformers key (under `encoder.block.N.`).
_BLOCK_KEYS: Mapping[str, str] = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
# transformers ties `encoder.embed_tokens` to `shared`; both keys are in its state dict.
_TOP_KEYS: Mapping[str, tuple[str, ...]] = {
    "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
    "norm.weight": ("encoder.final_layer_norm.weight",),
}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def umt5_config(**overrides) -> UMT5Config:
    """The umT5-XXL encoder config, with `overrides` applied (any `UMT5Config` field)."""
    return UMT5Config(**{**UMT5_XXL, **overrides})


def tiny_umt5_config(vocab_size: int = 64, **overrides) -> UMT5Config:
    """A CPU-sized umT5 (d_model 32, 2 layers, 4 heads) with the XXL buckets and activation."""
    tiny = dict(vocab_size=vocab_size, d_model=32, d_ff=48, num_heads=4, d_kv=8, num_layers=2)
    return umt5_config(**{**tiny, **overrides})


def convert_wan_t5_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the official Wan2.1 T5 encoder state dict onto `UMT5EncoderModel` keys.

    Args:
        sd: official keys `token_embedding.weight` [V, C], `blocks.N.*`, `norm.weight` [C].
    Returns:
        A new dict of the same tensors (no copies) under transformers keys.
    Raises:
        ValueError: naming the first unknown official key, or a key missing from a block.
    """
    out: dict[str, torch.Tensor] = {}
    blocks: set[int] = set()
    for key, value in sd.items():
        if key in _TOP_KEYS:
            for hf_key in _TOP_KEYS[key]:
                out[hf_key] = value
            continue
        match = _BLOCK_RE.fullmatch(key)
        if match is None or match.group(2) not in _BLOCK_KEYS:
            raise ValueError(f"unknown key in the Wan T5 state dict: {key!r}")
        blocks.add(int(match.group(1)))
        out[f"encoder.block.{match.group(1)}.{_BLOCK_KEYS[match.group(2)]}"] = value
    expected = list(_TOP_KEYS) + [
        f"blocks.{i}.{name}" for i in range(max(blocks, default=-1) + 1) for name in _BLOCK_KEYS
    ]
    missing = [key for key in expected if key not in sd]
    if missing:
        raise ValueError(f"missing key in the Wan T5 state dict: {missing[0]!r} ({len(missing)} missing)")
    return out


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: unescape HTML twice, collapse whitespace, strip.

    Wan also runs `ftfy.fix_text` (mojibake repair); it is used here when installed.
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanT5Encoder(nn.Module):
    """Frozen umT5 encoder + tokenizer: prompts -> zero-padded context [B, L, C] and lens [B]."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = T5_TOKENS):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    def train(self, mode: bool = True) -> "WanT5Encoder":
        """Frozen: always stays in eval mode (no dropout)."""
        return super().train(False)

    @classmethod
    def from_official(
        cls,
        checkpoint: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        config: UMT5Config | None = None,
    ) -> "WanT5Encoder":
        """Load `models_t5_umt5-xxl-enc-bf16.pth` (memory-mapped) and a local tokenizer dir.

        The model is built on the meta device and takes the mapped tensors as its parameters,
        so host RAM holds about one copy (none extra when `dtype` is the file's bf16).
        """
        logger.info("loading Wan T5 encoder from %s", checkpoint)
        sd = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
        model, info = UMT5EncoderModel.from_pretrained(
            None,
            config=config or umt5_config(),
            state_dict=convert_wan_t5_state_dict(sd),
            dtype=dtype,
            output_loading_info=True,
        )
        check_loading_info(info, f"Wan T5 checkpoint {checkpoint}")
        return cls(model.to(device), _load_tokenizer(tokenizer_dir))

    @classmethod
    def from_hf_dir(
        cls,
        model_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> "WanT5Encoder":
        """Load a transformers umT5 directory (encoder keys only are used); local files only."""
        model = UMT5EncoderModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        return cls(model.to(device), _load_tokenizer(tokenizer_dir or model_dir))

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts.

        Args:
            prompts: B strings.
        Returns:
            context: [B, L, C] in the model dtype, exactly zero after each prompt's tokens.
            lens: [B] int64 token counts (including the closing `</s>`), at most L.
        """
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = batch.input_ids.to(self.device)  # [B, L]
        mask = batch.attention_mask.to(self.device)  # [B, L]
        context = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, C]
        context = context.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
        return context, mask.sum(dim=1).long()

    forward = encode


def _load_tokenizer(tokenizer_dir: str | os.PathLike):
    """The umT5 tokenizer from a local directory (e.g. Wan2.1's `google/umt5-xxl/`)."""
    return AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir), local_files_only=True)
