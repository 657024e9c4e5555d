"""The DMD job's I2V encoder cache: read back bit for bit as encode_i2v builds it, sharded over ranks,
resumable, and refusing another cache kind, another negative prompt and another geometry."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data.cache import CachedOpenS2VDataset, CacheFormatError, build_cache
from data.encode import encode_i2v
from data.i2v import I2VImageDataset
from data.i2v_cache import (CachedI2VDataset, NegativePromptMismatch, build_i2v_cache, collate_cached_i2v_batch,
                            i2v_fingerprint)
from data.opens2v import MultiPartOpenS2VAdapterDataset
from model.encoders.bundle import load_frozen_encoders, write_tiny_encoders

FRAMES, HEIGHT, WIDTH = 3, 32, 48  # 3 latent frames = the image + 8 black pixel frames
NEGATIVE = "blurry, static"
PROMPTS = ["a red square", "a blue circle moving left slowly over the striped background", "green", "a dark ellipse"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return load_frozen_encoders(write_tiny_encoders(tmp_path_factory.mktemp("enc")))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """A JSONL of 4 (prompt, image) rows: noise images of an odd size (cover-resized to 32x48)."""
    root = tmp_path_factory.mktemp("i2v")
    rng = np.random.default_rng(0)
    for i in range(len(PROMPTS)):
        Image.fromarray(rng.integers(0, 256, (41, 59, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    path = root / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "image": f"img{i}.png"}) for i, p in enumerate(PROMPTS)))
    return path


def _dataset(rows):
    return I2VImageDataset(rows, height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="module")
def built(rows, encoders, tmp_path_factory):
    """The cache filled by two ranks (one after the other), one sample per shard."""
    path = tmp_path_factory.mktemp("cache")
    stats = [build_i2v_cache(_dataset(rows), encoders, path, FRAMES, NEGATIVE, rank=r, world_size=2, shard_size=1)
             for r in range(2)]
    return path, stats


def _assert_same_conditioning(got, want):
    for name in ("context", "context_lens", "clip_fea", "y"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


def test_cached_conditioning_is_bit_identical_to_encode_i2v(rows, encoders, built):
    ds, cached = _dataset(rows), CachedI2VDataset(built[0], FRAMES, HEIGHT, WIDTH)
    assert [cached[i]["index"] for i in range(len(cached))] == list(range(len(ds)))  # the dataset's order
    for i in range(len(ds)):
        batch = collate_cached_i2v_batch([cached[i]])
        want, want_first = encode_i2v(encoders, ds[i]["image"][None], [ds[i]["prompt"]], FRAMES)
        _assert_same_conditioning(batch["conditioning"], want)
        assert torch.equal(batch["first_latent"], want_first) and batch["prompts"] == [PROMPTS[i]]
        latent = cached[i]["latent"]  # [16, F, h, w]: the black frames after the image are encoded, not zeros
        assert latent.shape == (16, FRAMES, HEIGHT // 8, WIDTH // 8) and latent[:, 1:].abs().min() > 0
        assert cached[i]["context"].shape[0] == int(want.context_lens[0])  # only the valid tokens are stored
    context, lens = cached.negative(NEGATIVE)
    want_context, want_lens = encoders.t5.encode([NEGATIVE])
    assert torch.equal(context, want_context.float()) and torch.equal(lens, want_lens)
    # a batch of prompts of different lengths: each sample as encoded alone, zero-padded to the T5 length
    pair = collate_cached_i2v_batch([cached[0], cached[1]])["conditioning"]
    assert pair.context.shape[:2] == (2, want.context.shape[1]) and pair.context_lens.tolist() == [
        cached[0]["context"].shape[0], cached[1]["context"].shape[0]]
    together, _ = encode_i2v(encoders, torch.stack([ds[0]["image"], ds[1]["image"]]), PROMPTS[:2], FRAMES)
    for name in ("context", "clip_fea", "y"):
        torch.testing.assert_close(getattr(pair, name), getattr(together, name), rtol=1e-5, atol=1e-5)


def test_two_ranks_split_the_samples_into_marked_shards(built):
    path, stats = built
    assert [s.encoded for s in stats] == [2, 2] and all(s.already_cached == s.skipped_bad == 0 for s in stats)
    assert sorted(p.name for p in path.glob("manifest-r*.jsonl")) == ["manifest-r0.jsonl", "manifest-r1.jsonl"]
    assert len(list(path.glob("shard-r*.safetensors"))) == 4 and not list(path.glob("*.tmp"))
    rows = [json.loads(line) for p in sorted(path.glob("manifest-r*.jsonl")) for line in p.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 2, 1, 3]  # rank r encoded r, r + 2
    assert all(r["kind"] == "i2v" and r["format"] == 1 and r["frames"] == FRAMES for r in rows)


def test_resume_encodes_only_the_samples_not_yet_cached(rows, encoders, tmp_path, monkeypatch):
    import data.encode
    calls, real = [], data.encode.encode_i2v

    def crash_on_third(*args, **kwargs):
        calls.append(args[2][0])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(data.encode, "encode_i2v", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        build_i2v_cache(_dataset(rows), encoders, tmp_path, FRAMES, NEGATIVE, shard_size=1)
    assert len(list(tmp_path.glob("shard-r0-*.safetensors"))) == 2  # the two samples before the crash are kept
    calls.clear()
    monkeypatch.setattr(data.encode, "encode_i2v", lambda *a, **k: calls.append(a[2][0]) or real(*a, **k))
    again = build_i2v_cache(_dataset(rows), encoders, tmp_path, FRAMES, NEGATIVE, shard_size=1)
    assert (again.encoded, again.already_cached) == (2, 2) and calls == [PROMPTS[2], PROMPTS[3]]
    calls.clear()
    done = build_i2v_cache(_dataset(rows), encoders, tmp_path, FRAMES, NEGATIVE, shard_size=1)
    assert (done.encoded, done.already_cached) == (0, 4) and calls == []
    assert len(CachedI2VDataset(tmp_path)) == 4


def test_the_key_hashes_encoders_size_frames_image_and_prompt():
    image = torch.zeros(3, 32, 48)
    base = ("enc", 32, 48, 3, image, "p")
    key = i2v_fingerprint(*base)
    for i, changed in enumerate(("enc2", 16, 16, 5, image.clone().index_fill_(2, torch.tensor([0]), 0.5), "q")):
        assert i2v_fingerprint(*base[:i], changed, *base[i + 1:]) != key, i
    assert i2v_fingerprint(*base) == key


def test_an_opens2v_cache_and_an_i2v_cache_refuse_each_other(demo_data, encoders, built, tmp_path):
    i2v_dir = built[0]
    with pytest.raises(CacheFormatError, match=r"manifest-r0\.jsonl:1: a 'i2v' encoder cache, not the 'opens2v'"):
        CachedOpenS2VDataset(i2v_dir)
    opens2v = MultiPartOpenS2VAdapterDataset(demo_data.json_paths, demo_data.video_base_paths,
                                             demo_data.background_base_paths, num_training_frames=2,
                                             height=HEIGHT, width=WIDTH)
    build_cache(opens2v, encoders, tmp_path, rank=0, world_size=len(opens2v))  # one sample is enough
    with pytest.raises(CacheFormatError, match=r"manifest-r0\.jsonl:1: a 'opens2v' encoder cache, not the 'i2v'"):
        CachedI2VDataset(tmp_path)
    with pytest.raises(CacheFormatError, match=r"manifest-r0\.jsonl:1: a 'opens2v' encoder cache"):
        build_i2v_cache([], encoders, tmp_path, FRAMES, NEGATIVE)  # nor is one filled into the other


def test_another_negative_prompt_is_refused_naming_both_and_recaching_replaces_it(rows, encoders, built, tmp_path):
    with pytest.raises(NegativePromptMismatch, match=r"holds the negative prompt 'blurry, static', this run's "
                                                     r"negative_prompt is 'ugly'"):
        CachedI2VDataset(built[0]).negative("ugly")
    shutil.copytree(built[0], tmp_path, dirs_exist_ok=True)
    stats = build_i2v_cache(_dataset(rows), encoders, tmp_path, FRAMES, "ugly", shard_size=1)
    assert stats.encoded == 0  # the samples stay, only the negative prompt is re-encoded
    context, lens = CachedI2VDataset(tmp_path).negative("ugly")
    want, want_lens = encoders.t5.encode(["ugly"])
    assert torch.equal(context, want.float()) and torch.equal(lens, want_lens)


def test_a_cache_of_another_geometry_or_without_its_negative_prompt_is_refused(built, tmp_path):
    with pytest.raises(CacheFormatError, match=r"manifest-r0\.jsonl:1: cached with frames 3, this run has "
                                               r"num_training_frames 5"):
        CachedI2VDataset(built[0], latent_frames=5)
    with pytest.raises(CacheFormatError, match=r"cached with width 48, this run has width 64"):
        CachedI2VDataset(built[0], FRAMES, HEIGHT, 64)
    shutil.copytree(built[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / "negative_prompt.safetensors").unlink()
    with pytest.raises(ValueError, match=r"negative_prompt\.safetensors: missing"):
        CachedI2VDataset(tmp_path)
