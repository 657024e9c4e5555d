"""Torch-only types and index helpers shared by the attention registry, the Triton kernels and
their references: `KVPath`, key padding masks, per-sample lengths, the KV cache's visible slots.
No Triton import, so the registry, the model and its KV cache load without Triton.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Lengths = Union[int, torch.Tensor]  # a Python int for every sample, or a [B] int tensor


@dataclass(frozen=True)
class KVPath:
    """One key/value set of a multi-path attention.

    k, v: [B, Lk, N, D]. lens: optional [B] int, the valid key count per sample (<= Lk).
    """

    k: torch.Tensor
    v: torch.Tensor
    lens: Optional[torch.Tensor] = None


def key_padding_mask(k_lens: torch.Tensor, lk: int) -> torch.Tensor:
    """[B] lengths -> [B, 1, 1, Lk] bool mask, True where the key is attended."""
    return (torch.arange(lk, device=k_lens.device)[None, :] < k_lens[:, None])[:, None, None, :]


def per_sample(x: Lengths, b: int, device, name: str) -> torch.Tensor:
    """An int or a [B] int tensor -> a contiguous [B] int32 tensor on `device`."""
    t = torch.as_tensor(x, device=device, dtype=torch.int32)
    if t.dim() == 0:
        return t.expand(b).contiguous()
    if t.shape != (b,):
        raise ValueError(f"{name} must be an int or a [B={b}] tensor, got shape {tuple(t.shape)}")
    return t.contiguous()


def visible_slots(c: int, sink_len: int, window_start: int, window_len: int) -> torch.Tensor:
    """Slot indices of a C-slot KV cache (sink [0, sink_len), then a ring) that one sample
    attends to, in window order: the sink, then `window_len` ring slots from `window_start`,
    wrapping from C back to sink_len."""
    ring = c - sink_len
    window = [sink_len + (window_start - sink_len + i) % ring for i in range(window_len)] if ring else []
    return torch.tensor(list(range(sink_len)) + window, dtype=torch.long)
