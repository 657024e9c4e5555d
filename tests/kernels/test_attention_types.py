"""The torch-only helpers shared by the registry, the kernels and their references."""
import pytest
import torch

from kernels.attention_types import key_padding_mask, per_sample, visible_slots


def test_visible_slots_wrap_around_the_ring():
    # cache of 10: sink [0, 3), ring [3, 10); window of 5 from slot 8 wraps: 8, 9, 3, 4, 5
    assert visible_slots(10, 3, 8, 5).tolist() == [0, 1, 2, 8, 9, 3, 4, 5]
    assert visible_slots(10, 0, 4, 10).tolist() == [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]
    assert visible_slots(4, 4, 0, 0).tolist() == [0, 1, 2, 3]  # all sink, no ring


def test_key_padding_mask_keeps_the_first_lens_keys():
    mask = key_padding_mask(torch.tensor([3, 0, 5]), 5)
    assert mask.shape == (3, 1, 1, 5) and mask.dtype == torch.bool
    assert mask[:, 0, 0].int().tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_per_sample_broadcasts_ints_and_checks_tensors():
    assert per_sample(7, 3, "cpu", "sink_len").tolist() == [7, 7, 7]
    t = per_sample(torch.tensor([1, 2]), 2, "cpu", "sink_len")
    assert t.dtype == torch.int32 and t.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"window_len must be an int or a \[B=2\] tensor"):
        per_sample(torch.tensor([1, 2, 3]), 2, "cpu", "window_len")
