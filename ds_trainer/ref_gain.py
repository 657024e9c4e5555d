"""`ref_gain`: does the generator use its subject reference? A measured answer, not a falling loss.

On held-out samples, the flow-matching loss (ds_trainer/flow_step.py's `flow_matching_loss`, the
training loss) with each sample's own subject references against the loss with the references of
a sample from ANOTHER source video, at exactly the same noise and timesteps:

    ref_gain = mean loss with another clip's subject / mean loss with the sample's own subject

> 1 means the model's prediction depends on the reference and the right one helps. The new
reference paths start with zero value projections (model/wan.py: ZERO_INIT_MODULES) and a path's
output is softmax(q k^T) v, so with v = 0 every reference path adds exactly 0.0 to the
cross-attention sum: the untrained model's prediction does not depend on the reference at all,
and its ref_gain is exactly 1.

"Another source video": clips cut from one video show the same subject (OpenS2V's clusters, our
synthetic data's sources), so the swap partner is the next sample, cyclically, whose clip key names
another video (`source_video`). Draws come from (seed, sample, repeat) only, so every validation
of a run measures on the same noise.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ds_trainer.flow_step import FlowInputs, flow_matching_loss
from model.causal import CausalConfig
from model.conditioning import Conditioning
from model.flow_matching import FlowMatchingScheduler

REFERENCE_FIELDS = ("ref_vae", "ref_vae_lens", "ref_clip", "ref_clip_lens")
"""The Conditioning fields a swap exchanges (text, I2V inputs and latents stay the sample's own)."""
_CLIP_KEY = re.compile(r"^(?P<video>.+?)_part\d+_step1-")


@dataclass(frozen=True)
class RefGain:
    """Mean losses over the measured samples (and repeats) with their own / another clip's subject."""

    loss_own: float
    loss_other: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.loss_other / self.loss_own

    def metrics(self) -> dict[str, float]:
        return {"ref_gain": self.ratio, "ref_gain_loss_own": self.loss_own, "ref_gain_loss_other": self.loss_other}


def source_video(key: str) -> str:
    """The source video of an OpenS2V clip key (`<video_id>_part<k>_step1-...`); a key of another
    shape is its own source."""
    match = _CLIP_KEY.match(key)
    return match.group("video") if match else key


def swap_partners(keys: Sequence[str]) -> list[int]:
    """For each sample, the index of the next sample (cyclically) from another source video."""
    sources = [source_video(k) for k in keys]
    n = len(keys)
    partners = []
    for i in range(n):
        j = next((j for j in ((i + d) % n for d in range(1, n)) if sources[j] != sources[i]), None)
        if j is None:
            raise ValueError(f"ref_gain needs samples from at least two source videos; all {n} come from "
                             f"{sources[0]!r}")
        partners.append(j)
    return partners


def with_references_of(cond: Conditioning, donor: Conditioning) -> Conditioning:
    """`cond` with `donor`'s reference tensors and lengths (both one sample, [1, ...])."""
    return cond.replace(**{name: getattr(donor, name) for name in REFERENCE_FIELDS})


def draw_generator(seed: int, sample: int, repeat: int) -> torch.Generator:
    """The draws (timestep, noise) of one measurement: a function of (seed, sample, repeat) alone."""
    digest = hashlib.sha256(f"ref_gain/{seed}/{sample}/{repeat}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@torch.no_grad()
def sample_losses(model, own: FlowInputs, other: Conditioning, scheduler: FlowMatchingScheduler,
                  seed: int, sample: int, repeats: int = 1, causal: Optional[CausalConfig] = None,
                  teacher_forcing: bool = False) -> tuple[float, float]:
    """(summed loss with its own subject, summed loss with `other`'s subject) of one sample
    (`own`: batch of one) over `repeats` draws, each draw the same for both."""
    swapped = FlowInputs(own.latents, with_references_of(own.cond, other))
    loss_own = loss_other = 0.0
    for r in range(repeats):
        for inputs, acc in ((own, "own"), (swapped, "other")):
            loss = flow_matching_loss(model, inputs, scheduler, draw_generator(seed, sample, r), causal=causal,
                                      teacher_forcing=teacher_forcing).item()
            if acc == "own":
                loss_own += loss
            else:
                loss_other += loss
    return loss_own, loss_other


def measure(model, samples: Sequence[FlowInputs], keys: Sequence[str], scheduler: FlowMatchingScheduler,
            seed: int = 0, repeats: int = 1, causal: Optional[CausalConfig] = None,
            teacher_forcing: bool = False) -> RefGain:
    """ref_gain of `model` on `samples` (each a batch of one, with its clip key) in one process."""
    partners = swap_partners(keys)
    own = other = 0.0
    for i, inputs in enumerate(samples):
        a, b = sample_losses(model, inputs, samples[partners[i]].cond, scheduler, seed, i, repeats, causal,
                             teacher_forcing)
        own, other = own + a, other + b
    count = len(samples) * repeats
    return RefGain(own / count, other / count, len(samples))


def cached_samples(cache_dir, use_clip: bool, limit: Optional[int] = None) -> tuple[list[FlowInputs], list[str]]:
    """The first `limit` (None: all) samples of a `wanspeed cache` directory as batches of one, and
    their clip keys."""
    from data.cache import CachedOpenS2VDataset, collate_cached_batch  # noqa: PLC0415
    from ds_trainer.flow_step import inputs_from_batch  # noqa: PLC0415
    dataset = CachedOpenS2VDataset(cache_dir)
    samples, keys = [], []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        batch = collate_cached_batch([dataset[i]])
        samples.append(inputs_from_batch(batch, None, torch.device("cpu"), use_clip))
        keys.append(batch.keys[0])
    return samples, keys
