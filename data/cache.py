"""Encoder-output cache: precompute what the frozen encoders produce, so training needs none of
T5, CLIP or the VAE.

Per sample: video latents [16, F, h, w], reference VAE latents [R, 16, hr, wr], reference CLIP
tokens [R, K, C] (if a CLIP encoder is configured), T5 tokens [L, 4096] (the valid tokens only):
the reference layout of data/batch.py, batched by `collate_cached_batch` into an OpenS2VBatch.
Samples are keyed by a content hash of (encoder weights identity, resolution, frame indices,
clip key, prompt, chosen subjects). The random choices (frame start, subjects) are those of
epoch 0 and are FIXED per cached sample: training from the cache sees the same frames each epoch.

Layout: `<dir>/shard-r<rank>-<n>.safetensors` (written under a temporary name, then renamed) and
`<dir>/manifest-r<rank>.jsonl`, one line per sample, appended only after its shard is on disk.
Each rank encodes indices rank, rank + W, ...; a restarted job skips hashes already in any
manifest (resume), so a crash loses at most one unflushed shard.

Every manifest row carries the cache `kind` (OPENS2V_KIND here; the DMD job's I2V cache,
data/i2v_cache.py, writes its own with the same writer and reader) and `format` (CACHE_FORMAT); a
cache of another kind or format is an error naming its manifest, never read with the wrong layout.
Rows without a kind are OpenS2V rows (written before the marker). Format 2: ref_vae without the
one-frame time axis (format 1, unversioned, stored [R, 16, 1, hr, wr]).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from data.batch import EncodedInputs, OpenS2VBatch
from data.encode import encode_batch
from data.opens2v import collate_opens2v_batch

log = logging.getLogger(__name__)
MANIFEST_GLOB = "manifest-r*.jsonl"
OPENS2V_KIND = "opens2v"
CACHE_FORMAT = 2


class CacheFormatError(ValueError):
    """A cache of another kind (another job's), another format (another version of wanspeed), or
    made for another run (geometry, encoders)."""


@dataclass
class CacheStats:
    encoded: int = 0
    already_cached: int = 0
    skipped_bad: int = 0


def read_manifests(cache_dir: Path, kind: str = OPENS2V_KIND, version: int = CACHE_FORMAT,
                   check: Optional[Callable[[dict[str, Any]], Optional[str]]] = None) -> list[dict[str, Any]]:
    """Every cached sample's manifest row, in a stable order (rank files, then line order).
    A torn last line (a crash while appending) is ignored; a row of another cache kind or format,
    or one for which `check(row)` returns a reason, is a CacheFormatError naming the file and line."""
    rows = []
    for path in sorted(Path(cache_dir).glob(MANIFEST_GLOB)):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: ignoring a torn manifest line", path, n)
                continue
            found = row.get("kind", OPENS2V_KIND)
            if found != kind:
                raise CacheFormatError(
                    f"{path}:{n}: a {found!r} encoder cache, not the {kind!r} cache this reader needs (each job "
                    f"fills its own cache_dir with `wanspeed cache --config <its config>`)")
            if row.get("format", 1) != version:
                raise CacheFormatError(
                    f"{path}:{n}: cache format {row.get('format', 1)}, this version reads format {version} "
                    f"(see data/cache.py); rebuild the cache with `wanspeed cache` into an empty directory")
            problem = check(row) if check else None
            if problem:
                raise CacheFormatError(f"{path}:{n}: {problem}")
            rows.append(row)
    return rows


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file written under a temporary name, then renamed: never seen half-written."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _drop_torn_tail(manifest: Path) -> None:
    """Cut a crash-torn last line (no trailing newline) so new rows start on a line of their own."""
    if not manifest.exists():
        return
    data = manifest.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes)", manifest, len(data) - keep)
        with manifest.open("r+b") as fh:
            fh.truncate(keep)


def encode_sample(encoders, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The cached tensors of one dataset sample: `encode_batch` of a one-sample batch (so the
    cache holds exactly what the raw training path computes), the valid T5 tokens only."""
    enc = encode_batch(encoders, collate_opens2v_batch([sample]), clip=encoders.clip is not None)
    out = {"latents": enc.latents[0], "ref_vae": enc.ref_vae[0],                # [16, F, h, w], [R, 16, hr, wr]
           "context": enc.context[0, : int(enc.context_lens[0])]}              # [L, C]
    if enc.ref_clip is not None:
        out["ref_clip"] = enc.ref_clip[0]                                      # [R, K, C]
    return {k: v.cpu() for k, v in out.items()}


class CacheWriter:
    """Buffers encoded samples and flushes them as one shard + manifest rows (marked `kind`, `version`)."""

    def __init__(self, cache_dir: Path, rank: int, shard_size: int = 32, kind: str = OPENS2V_KIND,
                 version: int = CACHE_FORMAT):
        self.dir, self.rank, self.shard_size = Path(cache_dir), rank, shard_size
        self.kind, self.version = kind, version
        self.dir.mkdir(parents=True, exist_ok=True)
        self.buffer: list[tuple[dict, dict[str, torch.Tensor]]] = []
        self.manifest = self.dir / f"manifest-r{rank}.jsonl"
        _drop_torn_tail(self.manifest)
        existing = list(self.dir.glob(f"shard-r{rank}-*.safetensors"))
        self.next_shard = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in existing), default=-1)

    def add(self, row: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.buffer.append((row, tensors))
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"shard-r{self.rank}-{self.next_shard:05d}.safetensors"
        save_atomic({f"{row['hash']}/{k}": v for row, t in self.buffer for k, v in t.items()}, self.dir / name)
        with self.manifest.open("a") as fh:
            for row, tensors in self.buffer:
                fh.write(json.dumps({**row, "kind": self.kind, "format": self.version, "shard": name,
                                     "tensors": sorted(tensors)}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.next_shard += 1
        self.buffer.clear()


def build_cache(dataset, encoders, cache_dir: str | Path, rank: int = 0, world_size: int = 1, shard_size: int = 32,
                progress: Optional[Callable[[Iterable], Iterable]] = None) -> CacheStats:
    """Encode this rank's share of an OpenS2V (Multi)dataset into `cache_dir` (resumable)."""
    cache_dir = Path(cache_dir)
    done = {row["hash"] for row in read_manifests(cache_dir)}
    writer, stats = CacheWriter(cache_dir, rank, shard_size), CacheStats()
    indices = range(rank, len(dataset), world_size)
    for index in (progress(indices) if progress else indices):
        part, local = dataset.locate(index) if hasattr(dataset, "locate") else (dataset, index)
        try:
            fingerprint = part.plan(local).fingerprint(part.options, extra=encoders.identity)
        except Exception as err:  # a broken annotation: the dataset will count and replace it
            fingerprint = None
            log.debug("cannot plan sample %d: %s", index, err)
        if fingerprint in done:
            stats.already_cached += 1
            continue
        sample = part[local]
        if sample["index"] != local:  # bad sample, replaced: cache the replacement under its own hash
            stats.skipped_bad += 1
            fingerprint = part.plan(sample["index"]).fingerprint(part.options, extra=encoders.identity)
            if fingerprint in done:
                continue
        row = {"hash": fingerprint, "key": sample["key"], "prompt": sample["prompt"], "index": index,
               "frame_indices": sample["frame_indices"].tolist(), "subject_counts": int(sample["subject_images"].shape[0])}
        writer.add(row, encode_sample(encoders, sample))
        done.add(fingerprint)
        stats.encoded += 1
    writer.flush()
    return stats


def collate_cached_batch(samples: list[dict[str, Any]]) -> OpenS2VBatch:
    """Cached samples -> an OpenS2VBatch with `encoded` set: context zero-padded to the longest
    prompt (context_lens), references zero-padded to the largest count (ref_counts)."""
    counts = torch.tensor([s["ref_vae"].shape[0] for s in samples])
    encoded = EncodedInputs(
        latents=torch.stack([s["latents"] for s in samples]),
        context=pad_stack([s["context"] for s in samples]),
        context_lens=torch.tensor([s["context"].shape[0] for s in samples]),
        ref_vae=pad_stack([s["ref_vae"] for s in samples]),
        ref_clip=pad_stack([s["ref_clip"] for s in samples]) if "ref_clip" in samples[0] else None)
    return OpenS2VBatch(prompts=[s["prompt"] for s in samples], keys=[s["key"] for s in samples],
                        indices=torch.tensor([s["index"] for s in samples]), ref_counts=counts, encoded=encoded)


def pad_stack(tensors: Sequence[torch.Tensor], length: Optional[int] = None) -> torch.Tensor:
    """Stack along a new batch axis, zero-padding the first axis to `length` (default: the longest)."""
    length = max(t.shape[0] for t in tensors) if length is None else length
    out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


class CachedShards(Dataset):
    """The rows of one kind of cache and their tensors, read lazily from the shards (the base of
    each job's cached dataset). `check(row)`: a reason to refuse a row, e.g. another geometry."""

    def __init__(self, cache_dir: str | Path, kind: str = OPENS2V_KIND, version: int = CACHE_FORMAT,
                 check: Optional[Callable[[dict[str, Any]], Optional[str]]] = None):
        self.dir = Path(cache_dir)
        self.rows = read_manifests(self.dir, kind, version, check)
        if not self.rows:
            raise ValueError(f"{self.dir}: no cached samples (run `wanspeed cache --config ...` first)")
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _shard(self, name: str):
        if name not in self._handles:  # one open handle per shard and worker process
            self._handles[name] = safe_open(str(self.dir / name), framework="pt", device="cpu")
        return self._handles[name]

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The cached tensors of row `index`, by name."""
        row = self.rows[index]
        shard = self._shard(row["shard"])
        return {name: shard.get_tensor(f"{row['hash']}/{name}") for name in row["tensors"]}

    def __getstate__(self):  # open safetensors handles do not pickle into dataloader workers
        return {**self.__dict__, "_handles": {}}


class CachedOpenS2VDataset(CachedShards):
    """Training samples read back from the cache: no encoder is loaded.

    Sample: latents [16, F, h, w], ref_vae [R, 16, hr, wr], ref_clip [R, K, C] (if cached),
    context [L, C], prompt, key, index.
    """

    collate_fn = staticmethod(collate_cached_batch)
    """How create_opens2v_dataloader batches these samples."""

    def __init__(self, cache_dir: str | Path):
        super().__init__(cache_dir, OPENS2V_KIND, CACHE_FORMAT)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {**self.tensors(index), "prompt": row["prompt"], "key": row["key"], "index": index}
