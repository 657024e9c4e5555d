"""LongLive's streaming long tuning: one long video per stream, a few new frames per training step,
continuing from the generator's KV cache, the DMD and critic losses on a fixed-size window.

A stream starts from a batch (its prompt and first frame): fresh KV caches, and a first chunk of
`chunk` frames rolled out as in plain DMD training (the image latent as the independent first
block). Each later step adds `new` frames (a multiple of num_frame_per_block in [min_new, chunk],
drawn on rank 0 and broadcast, so every rank runs the same forwards), block by block at their true
positions (RoPE, the sink + window cache) with gradients only at each block's exit step; the loss
window is the last `chunk` frames: the previous window's tail (detached) followed by the new frames,
and only the new frames carry the generator's loss (`new_mask`). When a stream would pass
`max_length` frames the next step starts a new one from its batch; the batches of the steps in
between are not used (the data position still advances, so a run is reproducible).

The score models see each window as a video of its own: its first latent frame is decoded and
re-encoded as an I2V first frame (VAE latent, CLIP tokens: `reencode`), which makes the window's
conditioning, and replaces the window's frame 0. The generator keeps its stream's conditioning.

The stream lives in memory only: a resumed run starts a new stream (its KV cache, several GB per
rank at Wan-1.3B size, is not checkpointed), so a resume continues the run but not bit-exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ds_trainer.distributed import broadcast_object
from ds_trainer.dmd_config import StreamingSettings
from ds_trainer.self_forcing import draw_exit_steps, roll_block
from model.causal import CausalConfig, frame_blocks
from model.conditioning import Conditioning
from model.flow_matching import FlowMatchingScheduler


@dataclass
class Window:
    """What one streaming step trains on."""

    video: torch.Tensor
    """[B, 16, chunk, h, w]: the previous window's tail (no gradient) then the new frames."""
    cond: Conditioning
    """The window's own I2V conditioning (its first frame re-encoded)."""
    uncond: Conditioning
    """The same with the negative prompt (the real score's CFG)."""
    new_mask: torch.Tensor
    """[chunk] bool: the frames this step made (the generator's loss covers only them)."""
    stream_frames: int
    """Frames of the stream so far (the new frames end here)."""


@dataclass
class _Stream:
    caches: list
    cond: Conditioning
    uncond: Conditioning
    window: torch.Tensor
    frames: int


class StreamingRollout:
    """Keeps one stream per rank across steps (module docstring); `advance` makes the next window."""

    def __init__(self, settings: StreamingSettings, causal: CausalConfig, steps: list[float],
                 scheduler: FlowMatchingScheduler, context_noise: float, same_step_across_blocks: bool,
                 last_step_only: bool):
        self.settings, self.causal, self.steps, self.scheduler = settings, causal, steps, scheduler
        self.context_noise = context_noise
        self.same_step, self.last_step_only = same_step_across_blocks, last_step_only
        self.choices = settings.new_frame_choices(causal.num_frame_per_block)
        if not self.choices:
            raise ValueError(f"no multiple of num_frame_per_block {causal.num_frame_per_block} lies in "
                             f"[streaming_min_new_frame {settings.min_new}, streaming_chunk_size {settings.chunk}]")
        self.stream: Optional[_Stream] = None

    def advance(self, generator, model, start_stream: Callable[[], tuple[Conditioning, Conditioning, torch.Tensor]],
                reencode: Callable[[torch.Tensor, Conditioning, Conditioning], tuple[Conditioning, Conditioning, torch.Tensor]],
                rng: torch.Generator, draw_rng: torch.Generator, grad: bool) -> Window:
        """The next window. start_stream() -> (cond, uncond, first latent) of a new stream's batch,
        its y covering max_length frames; reencode(window, cond, uncond) -> (window cond, window
        uncond, re-encoded first latent [B, 16, 1, h, w]). rng: noise (per data-parallel rank);
        draw_rng: the new-frame count and exit steps (broadcast from rank 0)."""
        s = self.settings
        if self.stream is None or self.stream.frames + self.settings.min_new > s.max_length:
            return self._start(generator, model, start_stream, rng, draw_rng, grad)
        fit = [n for n in self.choices if self.stream.frames + n <= s.max_length]
        new = broadcast_object(fit[int(torch.randint(len(fit), (1,), generator=draw_rng))])
        st = self.stream
        with torch.set_grad_enabled(grad):  # each step's own graph (the last step's was freed by its backward)
            cross = model.cross_attention_cache(st.cond)
        block = self.causal.num_frame_per_block
        starts = list(range(st.frames, st.frames + new, block))
        exits = draw_exit_steps(len(starts), len(self.steps), draw_rng, self.same_step, self.last_step_only)
        out = []
        b, _, _, h, w = st.window.shape
        for i, start in enumerate(starts):
            noise = torch.randn((b, 16, block, h, w), generator=rng).to(st.window.device, st.window.dtype)
            y = st.cond.y[:, :, start:start + block] if st.cond.y is not None else None
            out.append(roll_block(generator, st.caches, cross, noise, y, start, self.steps, exits[i],
                                  self.scheduler, self.context_noise, grad, rng))
        video = torch.cat([st.window[:, :, new:].detach(), *out], dim=2)
        st.frames += new
        st.window = video.detach()
        return self._window(video, st, reencode, new)

    def _start(self, generator, model, start_stream, rng, draw_rng, grad) -> Window:
        s, causal = self.settings, self.causal
        cond, uncond, first = start_stream()
        b, _, _, h, w = cond.y.shape
        caches = model.kv_caches_for(first, s.max_length)
        with torch.set_grad_enabled(grad):
            cross = model.cross_attention_cache(cond)
        blocks = frame_blocks(s.chunk, causal)
        exits = draw_exit_steps(len(blocks), len(self.steps), draw_rng, self.same_step, self.last_step_only)
        out = []
        for index, (start, end) in enumerate(blocks):
            image = first if causal.independent_first_frame and index == 0 else None
            noise = torch.randn((b, 16, end - start, h, w), generator=rng).to(first.device, first.dtype)
            out.append(roll_block(generator, caches, cross, noise, cond.y[:, :, start:end], start, self.steps,
                                  exits[index], self.scheduler, self.context_noise, grad, rng, clean=image))
        video = torch.cat(out, dim=2)
        self.stream = _Stream(caches, cond, uncond, video.detach(), s.chunk)
        window = Window(video, cond.replace(y=cond.y[:, :, :s.chunk]), uncond.replace(y=uncond.y[:, :, :s.chunk]),
                        self._mask(s.chunk - int(causal.independent_first_frame)), s.chunk)
        return window

    def _window(self, video: torch.Tensor, st: _Stream, reencode, new: int) -> Window:
        cond, uncond, first = reencode(video, st.cond, st.uncond)
        video = torch.cat([first.to(video.dtype), video[:, :, 1:]], dim=2)  # frame 0 as the scores see it
        return Window(video, cond, uncond, self._mask(new), st.frames)

    def _mask(self, new: int) -> torch.Tensor:
        mask = torch.zeros(self.settings.chunk, dtype=torch.bool)
        mask[self.settings.chunk - new:] = True
        return mask


def reencode_window(encoders, video: torch.Tensor, cond: Conditioning, uncond: Conditioning):
    """(cond, uncond, first latent) of a window [B, 16, F, h, w] seen as an I2V video of its own:
    its first latent frame decoded to pixels and encoded again as a first frame (VAE latent and
    CLIP tokens, data/encode.py); the text context stays the stream's."""
    from data.encode import encode_first_frames  # noqa: PLC0415
    with torch.no_grad():
        pixels = encoders.vae.decode(video[:, :, :1].detach().float())[:, :, 0].clamp(-1, 1)  # [B, 3, H, W]
        clip_fea, y = encode_first_frames(encoders, pixels, video.shape[2])
    clip_fea, y = clip_fea.to(video.device), y.to(video.device)
    return cond.replace(clip_fea=clip_fea, y=y), uncond.replace(clip_fea=clip_fea, y=y), y[:, 4:, :1]
