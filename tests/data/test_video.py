"""Frame conversion: uint8 frames -> [3, T, H, W] in [-1, 1], against a float64 reference, and
the shared-memory allocation that lets a worker hand its batch over without a copy."""
import numpy as np
import torch
import torch.nn.functional as F

from data.batch import stack_for_transfer
from data.video import empty_for_transfer, image_to_model, resize_cover, to_unit_range, video_to_model


def _reference(frames: np.ndarray, rows, height: int, width: int) -> torch.Tensor:
    """Pick, resize (the same uint8 resize), then x / 127.5 - 1 in float64: [3, T, H, W]."""
    x = torch.from_numpy(frames[list(rows)].copy()).permute(0, 3, 1, 2)
    x = resize_cover(x, height, width)
    return (x.double() / 127.5 - 1.0).permute(1, 0, 2, 3)


def test_video_to_model_picks_repeats_and_converts_like_the_reference():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(7, 30, 50, 3), dtype=np.uint8)
    rows = [0, 2, 2, 5, 6]  # a skipped frame (1, 3, 4) and a repeated one, as short clips need
    out = video_to_model(frames, 16, 24, rows=rows)
    assert out.shape == (3, 5, 16, 24) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), _reference(frames, rows, 16, 24), rtol=0, atol=1e-7)
    corner = to_unit_range(torch.tensor([0, 255, 128], dtype=torch.uint8))  # the ends map exactly
    assert corner[:2].tolist() == [-1.0, 1.0]
    assert abs(corner[2].item() - (128 / 127.5 - 1.0)) < 1e-7


def test_video_to_model_reads_a_cropped_view_without_changing_it():
    frames = np.random.default_rng(1).integers(0, 256, size=(3, 40, 60, 3), dtype=np.uint8)
    before = frames.copy()
    view = frames[:, 5:35, 10:50]  # what metadata.crop gives: a strided view
    out = video_to_model(view, 30, 40)
    assert np.array_equal(frames, before)
    torch.testing.assert_close(out.double(), _reference(np.ascontiguousarray(view), range(3), 30, 40),
                               rtol=0, atol=1e-7)


def test_image_to_model_accepts_read_only_arrays():
    image = np.asarray(np.full((20, 30, 3), 255, dtype=np.uint8))
    image.flags.writeable = False  # what np.asarray(PIL image) returns
    out = image_to_model(image, 10, 10)
    assert out.shape == (3, 10, 10) and torch.all(out == 1.0)


def test_resize_cover_fills_and_centre_crops():
    x = torch.arange(2 * 3 * 10 * 40, dtype=torch.float32).reshape(2, 3, 10, 40)
    out = resize_cover(x, 20, 20)
    full = F.interpolate(x, size=(20, 80), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out, full[..., 30:50])


class _WhereAllocated(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return empty_for_transfer((4, 5)).is_shared()


def test_empty_for_transfer_uses_shared_memory_only_inside_workers():
    assert not empty_for_transfer((4, 5)).is_shared()
    in_worker = list(torch.utils.data.DataLoader(_WhereAllocated(), batch_size=None, num_workers=1))
    assert in_worker == [True, True]


def test_stack_for_transfer_views_one_tensor_and_stacks_several():
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    one = stack_for_transfer([a])
    assert one.shape == (1, 3, 2) and one.data_ptr() == a.data_ptr()  # a view, no copy
    torch.testing.assert_close(stack_for_transfer([a, b]), torch.stack([a, b]))


def test_shared_memory_warning_names_the_sizes(tmp_path):
    from data.opens2v import shared_memory_warning
    free = __import__("shutil").disk_usage(tmp_path).free
    assert shared_memory_warning(1024, workers=2, prefetch_factor=2, shm=tmp_path) is None
    assert shared_memory_warning(free, workers=0, prefetch_factor=2, shm=tmp_path) is None  # no workers, no shm
    msg = shared_memory_warning(free, workers=2, prefetch_factor=2, shm=tmp_path)
    assert msg and str(tmp_path) in msg and "--shm-size" in msg and f"{4 * free / 2**20:.0f} MiB" in msg
