"""Exponential moving average of a role's trainable weights (Self-Forcing's generator_ema), kept
per rank on the part of each parameter the rank owns: the ZeRO-3 partition (`ds_tensor`) or,
unpartitioned, the whole tensor. So the EMA costs each rank 1/world of a full fp32 copy, and
`full_tensors` assembles whole tensors on rank 0 for the checkpoint's `generator_ema`."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, module: torch.nn.Module):
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [_local(p).detach().float().clone() for _, p in self.named]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for s, (_, p) in zip(self.shadow, self.named):
            s.mul_(decay).add_(_local(p).float(), alpha=1 - decay)

    def state_dict(self) -> dict:
        """This rank's shards (for an exact resume; every rank saves its own)."""
        return {"names": [n for n, _ in self.named], "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        names = [n for n, _ in self.named]
        if state["names"] != names or any(a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("the EMA state is of another model or partitioning")
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)

    def full_tensors(self) -> dict[str, torch.Tensor] | None:
        """Whole EMA tensors on rank 0 (None elsewhere); a collective under ZeRO-3."""
        out = {}
        rank = dist.get_rank() if dist.is_initialized() else 0
        for s, (name, p) in zip(self.shadow, self.named):
            if hasattr(p, "ds_tensor") and dist.is_initialized() and dist.get_world_size() > 1:
                parts = [torch.empty_like(s) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, s)
                full = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            elif hasattr(p, "ds_tensor"):
                full = s[: p.ds_numel].view(p.ds_shape)
            else:
                full = s
            if rank == 0:
                out[name] = full.detach().to("cpu", copy=True)
        return out if rank == 0 else None
