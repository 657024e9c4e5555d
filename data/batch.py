"""`OpenS2VBatch`: the one batch type of the subject-reference job, from raw clips or the cache.

A raw batch carries pixels (`video`, `subject_images`); a cached batch carries what the frozen
encoders made of them (`encoded`). Everything else (prompts, keys, reference counts) is shared, so
the loader and the training step have one path for both (ds_trainer/flow_step.py).

Reference layout, the same from the dataset or the cache to the model (model/conditioning.py):
the reference axis R comes right after the batch axis. subject_images [B, R, 3, Hs, Ws];
ref_vae [B, R, 16, hr, wr]; ref_clip [B, R, K, C]. Samples with fewer than R subjects are padded
(white images, zero latents / tokens) and `ref_counts` [B] says how many are real.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from data.video import empty_for_transfer

TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EncodedInputs:
    """Frozen-encoder outputs of a batch (data/encode.py makes them; the cache stores them per sample).

    latents [B, 16, F, h, w]; context [B, L, 4096] zero-padded T5 tokens with context_lens [B];
    ref_vae [B, R, 16, hr, wr]; ref_clip [B, R, K, C] or None (no CLIP encoder)."""

    latents: torch.Tensor
    context: torch.Tensor
    context_lens: torch.Tensor
    ref_vae: torch.Tensor
    ref_clip: Optional[torch.Tensor] = None

    def map_tensors(self, fn: TensorFn) -> "EncodedInputs":
        return EncodedInputs(**{f.name: _apply(fn, getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass
class OpenS2VBatch:
    """A collated batch; raw (video + subject_images) or cached (encoded), never both.

    video [B, 3, T, H, W] in [-1, 1]; subject_images [B, R, 3, Hs, Ws] padded with white images;
    encoded: EncodedInputs. ref_counts [B]: real references per sample. prompts, keys: B strings;
    indices [B]: the dataset index actually loaded. Raw batches only: aes/gme scores [B, R],
    scores {tech, motion, aesthetic: [B]}, extras (foreground_image / background_image [B, 3, H, W]),
    skipped: every (kind, path) replaced while building the batch."""

    prompts: list[str]
    keys: list[str]
    indices: torch.Tensor
    ref_counts: torch.Tensor
    video: Optional[torch.Tensor] = None
    subject_images: Optional[torch.Tensor] = None
    encoded: Optional[EncodedInputs] = None
    subject_aes_scores: Optional[torch.Tensor] = None
    subject_gme_scores: Optional[torch.Tensor] = None
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        if (self.encoded is None) == (self.video is None):
            raise ValueError("an OpenS2VBatch holds either raw pixels (video, subject_images) or encoder outputs")

    def map_tensors(self, fn: TensorFn) -> "OpenS2VBatch":
        """A batch with `fn` applied to every tensor (nested ones too); strings and lists stay."""
        return dataclasses.replace(self, **{f.name: _apply(fn, getattr(self, f.name))
                                            for f in dataclasses.fields(self)})

    def pin_memory(self) -> "OpenS2VBatch":
        """What `DataLoader(pin_memory=True)` calls on a custom batch type: every tensor in
        page-locked memory, so the host-to-device copy can run asynchronously."""
        return self.map_tensors(torch.Tensor.pin_memory)


def _apply(fn: TensorFn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, EncodedInputs):
        return value.map_tensors(fn)
    if isinstance(value, dict):
        return {k: _apply(fn, v) for k, v in value.items()}
    return value


def stack_for_transfer(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack that copies as little as it can on the way to the main process:
    - tensors that already are the consecutive rows of one buffer (the dataset wrote each sample
      into its slot of a batch buffer, see OpenS2VAdapterDataset.__getitems__): that buffer, no copy;
    - one tensor: a view;
    - otherwise, inside a DataLoader worker, one stack into shared memory."""
    whole = _rows_of_one_buffer(tensors)
    if whole is not None:
        return whole
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)
    return torch.stack(tensors, out=empty_for_transfer((len(tensors), *tensors[0].shape), tensors[0].dtype))


def _rows_of_one_buffer(tensors: list[torch.Tensor]) -> Optional[torch.Tensor]:
    first = tensors[0]
    storage, n = first.untyped_storage(), first.numel()
    if not all(t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype
               and t.untyped_storage().data_ptr() == storage.data_ptr() and t.storage_offset() == i * n
               for i, t in enumerate(tensors)):
        return None
    if storage.nbytes() != len(tensors) * n * first.element_size():
        return None  # rows of a larger buffer: the stack must not expose the rest
    return torch.empty(0, dtype=first.dtype).set_(storage, 0, (len(tensors), *first.shape))
