"""Encoder-output cache: sharded across ranks, resumable, keyed by content, read back exactly."""
import shutil

import pytest
import torch

from data.cache import CachedOpenS2VDataset, build_cache, collate_cached_batch, encode_sample, read_manifests
from data.opens2v import MultiPartOpenS2VAdapterDataset
from model.encoders.bundle import load_frozen_encoders, write_tiny_encoders

SMALL = dict(num_training_frames=2, height=32, width=48)
CLOSE = dict(rtol=1e-5, atol=1e-5)  # one sample vs a batch of two through the same encoders


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


def test_a_cache_of_the_old_format_is_an_error_naming_its_manifest(built, tmp_path):
    import json
    from data.cache import CacheFormatError
    shutil.copytree(built[0], tmp_path, dirs_exist_ok=True)
    manifest = tmp_path / "manifest-r1.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0].pop("format")  # what format 1 wrote: no version, ref_vae [R, 16, 1, hr, wr]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CacheFormatError, match=r"manifest-r1\.jsonl:1: cache format 1, this version reads format 2"):
        CachedOpenS2VDataset(tmp_path)


def test_raw_and_cached_batches_give_the_model_the_same_inputs(demo_data, encoders, tmp_path):
    """One adapter path: the same samples raw (encoders run) and from the cache (no encoder)
    reach the model as the same Conditioning (up to batch-size-dependent float reassociation in
    the encoders: the cache encodes one sample at a time), with per-sample reference counts (2
    subjects at most: cached batches are padded like raw ones)."""
    from data.opens2v import collate_opens2v_batch, create_opens2v_dataloader
    from ds_trainer.flow_step import inputs_from_batch
    ds = MultiPartOpenS2VAdapterDataset(demo_data.json_paths, demo_data.video_base_paths, None,
                                        max_subjects_per_sample=2, **SMALL)
    build_cache(ds, encoders, tmp_path, shard_size=3)
    cached = CachedOpenS2VDataset(tmp_path)
    order = [row["index"] for row in cached.rows]
    raw_batches = [collate_opens2v_batch([ds[order[i]], ds[order[i + 1]]]) for i in range(0, len(order), 2)]
    cached_batches = list(create_opens2v_dataloader(cached, batch_size=2, num_workers=0))
    assert {tuple(b.ref_counts.tolist()) for b in raw_batches} - {(1, 1), (2, 2)}, "mixed subject counts"
    cpu = torch.device("cpu")
    for raw, cache in zip(raw_batches, cached_batches):
        assert cache.prompts == raw.prompts and torch.equal(cache.ref_counts, raw.ref_counts)
        a, b = inputs_from_batch(raw, encoders, cpu, True), inputs_from_batch(cache, None, cpu, True)
        torch.testing.assert_close(b.latents, a.latents, **CLOSE)
        for name in ("context_lens", "ref_vae_lens", "ref_clip_lens"):
            assert torch.equal(getattr(b.cond, name), getattr(a.cond, name)), name
        n = int(a.cond.context_lens.max())
        torch.testing.assert_close(b.cond.context[:, :n], a.cond.context[:, :n], **CLOSE)
        for i, r in enumerate(raw.ref_counts.tolist()):  # real references equal; padding is masked
            torch.testing.assert_close(b.cond.ref_vae[i, :r], a.cond.ref_vae[i, :r], **CLOSE)
            torch.testing.assert_close(b.cond.ref_clip[i, :r], a.cond.ref_clip[i, :r], **CLOSE)
    with pytest.raises(ValueError, match="needs the frozen encoders"):
        inputs_from_batch(raw_batches[0], None, cpu, True)
