"""Plain-PyTorch reference of multi-path attention (the fused cross-attention kernel's float64
truth in tests). Torch only: the registry re-exports it and model tests use it without Triton.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kernels.attention_types import KVPath, key_padding_mask


def multi_path_attention_ref(q: torch.Tensor, paths: Sequence[KVPath]) -> torch.Tensor:
    """sum_s softmax(q k_s^T / sqrt(D)) v_s with an explicit softmax per path, any dtype incl.
    float64; keys past `lens[b]` masked, a zero-length path adds 0.

    q: [B, Lq, N, D]; returns [B, Lq, N, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    for p in paths:
        s = torch.einsum("bqnd,bknd->bnqk", q, p.k.to(q.dtype)) * scale
        if p.lens is not None:
            s = s.masked_fill(~key_padding_mask(p.lens.to(q.device), p.k.shape[1]), float("-inf"))
        w = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a zero-length path gives an all-NaN row
        out = out + torch.einsum("bnqk,bknd->bqnd", w, p.v.to(q.dtype))
    return out
