"""OpenS2VBatch: one type for raw and cached batches, pinning, and no second copy of the video
on its way from a DataLoader worker (real mp4 decoding, real workers)."""
import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin

from data.batch import EncodedInputs, OpenS2VBatch, stack_for_transfer
from data.opens2v import MultiPartOpenS2VAdapterDataset, collate_opens2v_batch

SMALL = dict(num_training_frames=3, height=64, width=96)


def _dataset(d, **kw):
    return MultiPartOpenS2VAdapterDataset(d.json_paths, d.video_base_paths, d.background_base_paths, **SMALL, **kw)


def _tensors(batch):
    out = [batch.indices, batch.ref_counts, batch.video, batch.subject_images, batch.subject_aes_scores,
           batch.subject_gme_scores, *batch.scores.values(), *batch.extras.values()]
    return [t for t in out if t is not None]


def test_a_batch_is_raw_or_encoded_never_both_nor_neither():
    ids = dict(prompts=["a"], keys=["k"], indices=torch.tensor([0]), ref_counts=torch.tensor([1]))
    enc = EncodedInputs(torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 3, 8), torch.tensor([3]), torch.zeros(1, 1, 16, 2, 2))
    with pytest.raises(ValueError, match="either raw pixels"):
        OpenS2VBatch(**ids)
    with pytest.raises(ValueError, match="either raw pixels"):
        OpenS2VBatch(**ids, video=torch.zeros(1, 3, 1, 8, 8), subject_images=torch.zeros(1, 1, 3, 8, 8), encoded=enc)
    cached = OpenS2VBatch(**ids, encoded=enc)
    cloned = cached.map_tensors(torch.clone)  # nested encoder outputs are visited too
    assert cloned.encoded.latents is not enc.latents and cloned.prompts == ["a"]


def test_map_tensors_reaches_every_tensor_of_a_raw_batch(demo_data):
    ds = _dataset(demo_data, return_background=True, return_foreground=True)
    batch = collate_opens2v_batch([ds[0], ds[1]])
    seen = []
    mapped = batch.map_tensors(lambda t: seen.append(t) or t + 0)
    assert len(seen) == len(_tensors(batch)) == 11
    for a, b in zip(_tensors(batch), _tensors(mapped)):
        assert b is not a and torch.equal(a, b)
    assert mapped.prompts == batch.prompts and mapped.skipped == batch.skipped


def test_the_dataloader_pin_step_pins_the_batch(demo_data):
    """DataLoader(pin_memory=True) calls `pin_memory()` on a custom batch: without the method the
    batch passed through unpinned. On CPU-only torch pinning itself raises, which shows the
    call reached every tensor's pin_memory."""
    batch = collate_opens2v_batch([_dataset(demo_data)[0]])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            dataloader_pin(batch)
        return
    pinned = dataloader_pin(batch)
    assert isinstance(pinned, OpenS2VBatch) and all(t.is_pinned() for t in _tensors(pinned))


def test_batch_videos_are_decoded_into_one_buffer_and_collated_without_a_copy(demo_data):
    ds = _dataset(demo_data)
    samples = ds.__getitems__([0, 3, 5])  # indices from both parts
    batch = collate_opens2v_batch(samples)
    assert batch.video.untyped_storage().data_ptr() == samples[0]["video"].untyped_storage().data_ptr()
    for k, (s, i) in enumerate(zip(samples, (0, 3, 5))):
        assert s["video"].data_ptr() == batch.video[k].data_ptr()
        torch.testing.assert_close(batch.video[k], ds[i]["video"], rtol=0, atol=0)  # same values as one by one


def test_rows_of_a_larger_buffer_are_copied_not_exposed():
    buf = torch.randn(3, 4)
    out = stack_for_transfer([buf[0], buf[1]])
    assert out.shape == (2, 4) and out.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
    torch.testing.assert_close(out, buf[:2])
    whole = stack_for_transfer([buf[0], buf[1], buf[2]])
    assert whole.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


class _BuffersInWorker(torch.utils.data.Dataset):
    """Runs a batch's fetch + collate inside a DataLoader worker (what the worker does with
    batch_size > 1) and reports the shared-memory storages it allocated for the videos."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return 1

    def __getitem__(self, _):
        samples = self.ds.__getitems__([0, 1])
        batch = collate_opens2v_batch(samples)
        storages = {s["video"].untyped_storage().data_ptr() for s in samples}
        return len(storages), batch.video.is_shared(), batch.video.untyped_storage().data_ptr() in storages


def test_a_worker_hands_over_one_shared_video_buffer_per_batch(demo_data):
    loader = torch.utils.data.DataLoader(_BuffersInWorker(_dataset(demo_data)), batch_size=None, num_workers=1)
    assert [tuple(r) for r in loader] == [(1, True, True)]  # one storage, in shared memory, and it IS the batch


def test_batches_from_a_two_worker_loader_hold_the_video_in_one_shared_buffer(demo_data):
    from data.opens2v import create_opens2v_dataloader
    from data.sampler import ResumableDistributedSampler
    ds = _dataset(demo_data)
    batches = list(create_opens2v_dataloader(ds, batch_size=2, sampler=ResumableDistributedSampler(len(ds), shuffle=False),
                                             num_workers=2))
    assert len(batches) == len(ds) // 2
    for n, b in enumerate(batches):
        assert b.video.is_shared() and b.video.shape == (2, 3, 9, 64, 96)
        torch.testing.assert_close(b.video[1], ds[2 * n + 1]["video"], rtol=0, atol=0)
