"""The DMD job's I2V encoder cache: what `encode_i2v` computes per (first frame, prompt), so a
run trains without T5, CLIP or the VAE loaded.

Per sample: `context` [L, C] (the prompt's valid T5 tokens only), `clip_fea` [K, C] (CLIP tokens of
the image, K = 257 for Wan) and `latent` [16, F, h, w], the VAE latent of the video [image, black
frames...] (the causal VAE encodes the black frames after the image: NOT zeros past frame 0).
Read back, `y` = [mask 4 | latent 16] (the mask 1 on latent frame 0), the first latent is
latent[:, :1] and the context is zero-padded to the T5 length again: the same Conditioning as
`encode_i2v` (checked bit for bit in tests/data/test_i2v_cache.py).

Plus `negative_prompt.safetensors`: the T5 tokens of the run's negative prompt (the real score's
CFG); a run whose negative_prompt differs is refused naming both strings.

Shards, manifests, resume and rank sharding are data/cache.py's (kind I2V_KIND: an OpenS2V cache
and an I2V one refuse each other). Samples are keyed by a hash of (encoder identity, frame size,
latent frames, the preprocessed image's pixels, prompt). The image is that of epoch 0 (for
OpenS2V first frames: epoch 0's sampled frame), fixed in the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from safetensors import safe_open

from data.cache import CachedShards, CacheFormatError, CacheStats, CacheWriter, pad_stack, read_manifests, save_atomic

log = logging.getLogger(__name__)
I2V_KIND = "i2v"
I2V_CACHE_FORMAT = 1
NEGATIVE_FILE = "negative_prompt.safetensors"
MASK_CHANNELS = 4
"""y = [mask 4 | latent 16]: Wan I2V's in_dim 36 = 16 noise + 20 conditioning channels."""


class NegativePromptMismatch(ValueError):
    """The cache holds another negative prompt's T5 tokens than the run asks for."""


def i2v_fingerprint(identity: str, height: int, width: int, latent_frames: int, image: torch.Tensor,
                    prompt: str) -> str:
    """Content hash of everything that determines one sample's encoder outputs; image [3, H, W]."""
    h = hashlib.sha256(json.dumps(dict(kind=I2V_KIND, encoders=identity, size=[height, width], frames=latent_frames,
                                       prompt=prompt), sort_keys=True).encode())
    h.update(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def encode_i2v_sample(encoders, image: torch.Tensor, prompt: str, latent_frames: int) -> dict[str, torch.Tensor]:
    """The cached tensors of one (image [3, H, W], prompt): encode_i2v of a one-sample batch, as
    the encoder training path computes it (batch_size 1), the valid T5 tokens only."""
    from data.encode import encode_i2v  # noqa: PLC0415

    cond, _ = encode_i2v(encoders, image[None], [prompt], latent_frames)
    valid = int(cond.context_lens[0])
    return {"context": cond.context[0, :valid].cpu(), "clip_fea": cond.clip_fea[0].cpu(),  # [L, C], [K, C]
            "latent": cond.y[0, MASK_CHANNELS:].cpu()}                                    # [16, F, h, w]


def write_negative(encoders, cache_dir: Path, prompt: str) -> None:
    """The negative prompt's valid T5 tokens [L, C] (+ the prompt, the T5 length and the encoders'
    identity as metadata); rewritten only when the prompt or the encoders changed."""
    path = Path(cache_dir) / NEGATIVE_FILE
    if path.exists():
        meta = _negative_metadata(path)
        if meta.get("prompt") == prompt and meta.get("encoders") == encoders.identity:
            return
        log.info("%s: replacing the cached negative prompt %r with %r", path, meta.get("prompt"), prompt)
    with torch.no_grad():
        context, lens = encoders.t5.encode([prompt])  # [1, T, C], [1]
    meta = {"kind": I2V_KIND, "format": str(I2V_CACHE_FORMAT), "prompt": prompt, "encoders": encoders.identity,
            "text_len": str(context.shape[1])}
    save_atomic({"context": context[0, : int(lens[0])].float().cpu()}, path, meta)


def _negative_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        return fh.metadata() or {}


def build_i2v_cache(dataset, encoders, cache_dir: str | Path, latent_frames: int, negative_prompt: str,
                    rank: int = 0, world_size: int = 1, shard_size: int = 32,
                    progress: Optional[Callable[[Iterable], Iterable]] = None) -> CacheStats:
    """Encode this rank's share (indices rank, rank + W, ...) of an I2V dataset (samples: image
    [3, H, W], prompt, index) into `cache_dir`; rank 0 also writes the negative prompt. Resumable:
    samples whose hash is in any manifest are skipped (a bad row's replacement hashes as itself)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = {row["hash"] for row in read_manifests(cache_dir, I2V_KIND, I2V_CACHE_FORMAT)}  # another kind: refused
    if rank == 0:
        write_negative(encoders, cache_dir, negative_prompt)
    writer = CacheWriter(cache_dir, rank, shard_size, kind=I2V_KIND, version=I2V_CACHE_FORMAT)
    stats = CacheStats()
    indices = range(rank, len(dataset), world_size)
    for index in (progress(indices) if progress else indices):
        sample = dataset[index]
        image = sample["image"]  # [3, H, W]
        if sample["index"] != index:  # a bad row, replaced by the next good one
            stats.skipped_bad += 1
        key = i2v_fingerprint(encoders.identity, image.shape[1], image.shape[2], latent_frames, image, sample["prompt"])
        if key in done:
            stats.already_cached += 1
            continue
        row = {"hash": key, "prompt": sample["prompt"], "index": int(sample["index"]), "encoders": encoders.identity,
               "height": int(image.shape[1]), "width": int(image.shape[2]), "frames": latent_frames}
        tensors = encode_i2v_sample(encoders, image, sample["prompt"], latent_frames)
        writer.add(row, tensors)
        done.add(key)
        stats.encoded += 1
    writer.flush()
    return stats


def collate_cached_i2v_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Cached samples -> {"conditioning": Conditioning as encode_i2v builds it, "first_latent"
    [B, 16, 1, h, w], "prompts", "indices" (the source dataset's rows)}: context zero-padded to the
    T5 length, y = [mask | latent]."""
    from model.conditioning import Conditioning  # noqa: PLC0415

    from data.encode import i2v_y  # noqa: PLC0415

    latent = torch.stack([s["latent"] for s in samples])  # [B, 16, F, h, w]
    cond = Conditioning(context=pad_stack([s["context"] for s in samples], samples[0]["text_len"]),
                        context_lens=torch.tensor([s["context"].shape[0] for s in samples], dtype=torch.int64),
                        clip_fea=torch.stack([s["clip_fea"] for s in samples]), y=i2v_y(latent))
    return {"conditioning": cond, "first_latent": latent[:, :, :1], "prompts": [s["prompt"] for s in samples],
            "indices": torch.tensor([s["index"] for s in samples])}


class CachedI2VDataset(CachedShards):
    """DMD training samples read back from an I2V cache: no encoder is loaded.

    Sample: context [L, C], clip_fea [K, C], latent [16, F, h, w], text_len, prompt, index (the
    source row). Rows are in the source dataset's order, so the sampler draws the samples a run
    on the encoders draws. With `latent_frames` / `height` / `width`, a cache made for another
    geometry is refused.
    """

    collate_fn = staticmethod(collate_cached_i2v_batch)
    """How the DMD trainer's DataLoader batches these samples."""

    def __init__(self, cache_dir: str | Path, latent_frames: Optional[int] = None, height: Optional[int] = None,
                 width: Optional[int] = None):
        self.negative_path = Path(cache_dir) / NEGATIVE_FILE
        if not self.negative_path.is_file():
            read_manifests(cache_dir, I2V_KIND, I2V_CACHE_FORMAT)  # another job's cache: say so first
            raise ValueError(f"{self.negative_path}: missing (an I2V cache holds the negative prompt's T5 tokens; "
                             f"fill {cache_dir} with `wanspeed cache --config <the DMD config>`)")
        self.negative_meta = _negative_metadata(self.negative_path)
        if self.negative_meta.get("kind") != I2V_KIND:
            raise CacheFormatError(f"{self.negative_path}: not an I2V cache file (kind {self.negative_meta.get('kind')!r})")
        self.text_len = int(self.negative_meta["text_len"])
        expected = {"frames": latent_frames, "height": height, "width": width,
                    "encoders": self.negative_meta.get("encoders")}
        names = {"frames": "num_training_frames", "height": "height", "width": "width"}

        def check(row: dict[str, Any]) -> Optional[str]:
            for field, want in expected.items():
                if want is not None and row.get(field) != want:
                    if field == "encoders":
                        return (f"encoded by other encoders ({row.get(field)}) than the negative prompt in "
                                f"{self.negative_path.name} ({want}); refill the cache into an empty directory")
                    return (f"cached with {field} {row.get(field)}, this run has {names[field]} {want}; fill another "
                            f"cache_dir for this run with `wanspeed cache`")
            return None

        super().__init__(cache_dir, I2V_KIND, I2V_CACHE_FORMAT, check)
        self.rows.sort(key=lambda row: row["index"])  # the dataset's order, whichever rank cached a row

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {**self.tensors(index), "text_len": self.text_len, "prompt": row["prompt"], "index": row["index"]}

    def negative(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [1, T, C] zero-padded to the T5 length, lens [1]) of the cached negative prompt,
        as `t5.encode([prompt])` returns them; another prompt than the cached one is refused."""
        cached = self.negative_meta.get("prompt")
        if cached != prompt:
            raise NegativePromptMismatch(
                f"{self.negative_path}: the cache holds the negative prompt {cached!r}, this run's negative_prompt "
                f"is {prompt!r}; run `wanspeed cache --config <this config>` to re-encode it")
        with safe_open(str(self.negative_path), framework="pt", device="cpu") as fh:
            context = fh.get_tensor("context")  # [L, C]
        return pad_stack([context], self.text_len), torch.tensor([context.shape[0]], dtype=torch.int64)
