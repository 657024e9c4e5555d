"""The resumable sampler: deterministic, rank-disjoint, and resumed runs continue exactly."""
import pytest

from data.sampler import ResumableDistributedSampler


def _epoch(n, world, seed=3, epoch=0):
    out = []
    for r in range(world):
        s = ResumableDistributedSampler(n, r, world, seed)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_ranks_partition_each_epoch_and_epochs_differ():
    per_rank = _epoch(10, 2)
    assert sorted(per_rank[0] + per_rank[1]) == list(range(10))
    assert len(per_rank[0]) == len(per_rank[1]) == 5
    assert _epoch(10, 2, epoch=1) != per_rank
    assert _epoch(10, 2) == per_rank  # deterministic from the seed


def test_uneven_length_pads_by_wrapping_so_ranks_have_equal_counts():
    per_rank = _epoch(7, 3)
    assert {len(p) for p in per_rank} == {3}
    assert set(sum(per_rank, [])) == set(range(7))


def _consume(sampler, steps):
    it = iter(sampler)
    seen = [next(it) for _ in range(steps)]
    sampler.advance(steps)
    return seen


@pytest.mark.parametrize("stop_at", [1, 4, 5, 9])
def test_resume_continues_with_exactly_the_samples_it_would_have_seen(stop_at):
    n, world = 10, 2
    # uninterrupted: two epochs on each rank
    full = {r: [] for r in range(world)}
    for r in range(world):
        s = ResumableDistributedSampler(n, r, world, seed=1)
        for _ in range(2):
            full[r] += list(s)
            s.advance(len(s))
    # interrupted after `stop_at` samples per rank, state saved, new sampler resumed
    for r in range(world):
        s = ResumableDistributedSampler(n, r, world, seed=1)
        seen = []
        while len(seen) < stop_at:
            take = min(stop_at - len(seen), len(s))
            seen += _consume(s, take)
        state = s.state_dict()
        resumed = ResumableDistributedSampler(n, r, world, seed=1)
        resumed.load_state_dict(state)
        while len(seen) < 2 * n // world:
            seen += _consume(resumed, len(resumed))
        assert seen == full[r]


def test_resume_on_a_different_world_size_serves_the_rest_of_the_epoch_once():
    n = 12
    s = ResumableDistributedSampler(n, 0, 2, seed=5)
    first = [list(ResumableDistributedSampler(n, r, 2, seed=5))[:3] for r in range(2)]
    s.advance(3)
    state = s.state_dict()
    rest = []
    for r in range(3):
        t = ResumableDistributedSampler(n, r, 3, seed=5)
        t.load_state_dict(state)
        rest += list(t)
    assert sorted(sum(first, []) + rest) == list(range(n))


def test_state_of_another_dataset_is_refused():
    s = ResumableDistributedSampler(10, 0, 1, seed=0)
    with pytest.raises(ValueError, match="dataset_len=10"):
        ResumableDistributedSampler(11, 0, 1, seed=0).load_state_dict(s.state_dict())


def _trainer_epochs(n, world, batch, accumulation, steps):
    """What `Trainer.train` does on every rank, with real DataLoaders (drop_last) over a dataset of
    `n` items: rebuild the loader each epoch, advance by a batch per micro-batch, count optimizer
    steps every `accumulation` micro-batches (windows may span epochs). Returns per-rank batch
    counts per loader pass and the items each rank saw."""
    import torch

    samplers = [ResumableDistributedSampler(n, r, world, seed=2, batch_size=batch) for r in range(world)]
    passes = {r: [] for r in range(world)}
    seen = {r: [] for r in range(world)}
    micro = done = 0
    while done < steps:
        loaders = [torch.utils.data.DataLoader(list(range(n)), batch_size=batch, sampler=s, drop_last=True)
                   for s in samplers]
        counts = [0] * world
        for batches in zip(*loaders):  # the ranks step together: a collective per micro-batch
            for r, b in enumerate(batches):
                counts[r] += 1
                seen[r] += b.tolist()
                samplers[r].advance(batch)
            micro += 1
            if micro % accumulation == 0:
                done += 1
                if done >= steps:
                    break
        for r in range(world):
            assert sum(1 for _ in loaders[r]) >= 0  # each loader can still be iterated (no state left behind)
            passes[r].append(counts[r])
        assert counts[0] > 0, f"an empty epoch: the trainer would spin (n={n}, world={world}, batch={batch})"
    return passes, seen


@pytest.mark.parametrize("n", [1, 3, 4, 5, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_every_epoch_gives_every_rank_the_same_number_of_full_batches(n, world, batch, accumulation):
    """Dataset sizes not a multiple of world x batch, and smaller than it, used to yield an empty
    loader after the first epoch (drop_last), so the trainer rebuilt loaders forever."""
    passes, seen = _trainer_epochs(n, world, batch, accumulation, steps=3 * -(-n // (world * batch)) + 1)
    assert len({tuple(p) for p in passes.values()}) == 1, passes  # equal batch counts on every rank
    assert all(c >= 1 for c in passes[0]), passes
    per_epoch = -(-n // (world * batch)) * world * batch
    first_epoch = sorted(i for r in seen for i in seen[r][: per_epoch // world])
    assert set(first_epoch) == set(range(n))  # every item served in each epoch (repeats pad the tail)
