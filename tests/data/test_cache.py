"""Encoder-output cache: sharded across ranks, resumable, keyed by content, read back exactly."""
import shutil

import pytest
import torch

from data.cache import CachedOpenS2VDataset, build_cache, collate_cached_batch, encode_sample, read_manifests
from data.opens2v import MultiPartOpenS2VAdapterDataset
from model.encoders.bundle import load_frozen_encoders, write_tiny_encoders

SMALL = dict(num_training_frames=2, height=32, width=48)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return load_frozen_encoders(write_tiny_encoders(tmp_path_factory.mktemp("enc")))


def _dataset(d):
    return MultiPartOpenS2VAdapterDataset(d.json_paths, d.video_base_paths, d.background_base_paths, **SMALL)


@pytest.fixture(scope="module")
def built(demo_data, encoders, tmp_path_factory):
    """The cache filled by two ranks (run one after the other), shards of 2 samples."""
    path = tmp_path_factory.mktemp("cache")
    stats = [build_cache(_dataset(demo_data), encoders, path, rank=r, world_size=2, shard_size=2) for r in range(2)]
    return path, stats


def test_two_ranks_fill_the_cache_and_it_reads_back_exactly(demo_data, encoders, built):
    ds = _dataset(demo_data)
    tmp_path, stats = built
    assert sum(s.encoded for s in stats) == len(ds)
    assert sorted(p.name for p in tmp_path.glob("manifest-r*.jsonl")) == ["manifest-r0.jsonl", "manifest-r1.jsonl"]
    cached = CachedOpenS2VDataset(tmp_path)
    assert len(cached) == len(ds)
    by_index = {row["index"]: i for i, row in enumerate(cached.rows)}
    for index in (0, 3):
        direct = encode_sample(encoders, ds[index])
        got = cached[by_index[index]]
        assert got["latents"].shape == (16, 2, 4, 6) and got["ref_vae"].shape == (1, 16, 4, 6)
        for name, tensor in direct.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)
        assert got["prompt"] == ds[index]["prompt"]
    batch = collate_cached_batch([cached[0], cached[1]])
    enc = batch.encoded
    assert enc.context.shape[0] == 2 and enc.context_lens.max() == enc.context.shape[1]
    assert enc.ref_clip.shape[:2] == (2, 1) and enc.ref_vae.shape == (2, 1, 16, 4, 6)
    assert batch.video is None and batch.ref_counts.tolist() == [1, 1]


def test_resume_encodes_only_what_is_missing(demo_data, encoders, built, tmp_path):
    ds = _dataset(demo_data)
    shutil.copytree(built[0], tmp_path, dirs_exist_ok=True)
    again = build_cache(ds, encoders, tmp_path, shard_size=2)
    assert again.encoded == 0 and again.already_cached == len(ds)
    # a crash after the last shard was written but before its manifest rows: rows lost -> re-encoded
    manifest = tmp_path / "manifest-r1.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-2]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # + a torn line
    resumed = build_cache(ds, encoders, tmp_path, rank=1, world_size=2, shard_size=2)
    assert resumed.encoded == 2 and resumed.already_cached == len(ds) // 2 - 2
    assert len({r["hash"] for r in read_manifests(tmp_path)}) == len(ds)


def test_key_changes_with_encoder_weights_and_resolution(demo_data, encoders, tmp_path):
    ds = _dataset(demo_data)
    part, local = ds.locate(0)
    plan = part.plan(local)
    assert plan.fingerprint(part.options, "enc-a") != plan.fingerprint(part.options, "enc-b")
    bigger = MultiPartOpenS2VAdapterDataset(demo_data.json_paths, demo_data.video_base_paths, None,
                                            **{**SMALL, "height": 64, "width": 96})
    p2, l2 = bigger.locate(0)
    assert p2.plan(l2).fingerprint(p2.options, "enc-a") != plan.fingerprint(part.options, "enc-a")


def test_empty_cache_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no cached samples"):
        CachedOpenS2VDataset(tmp_path)
