"""The demo's subject-likeness measures (ds_trainer/subject_likeness.py) on frames whose answer is known."""
import pytest
import torch

from ds_trainer.subject_likeness import colour_distance, colour_histogram, latent_distances, subject_pixels


def _frames(colour, t=3, h=8, w=8):
    return torch.tensor(colour, dtype=torch.float32)[:, None, None, None].expand(3, t, h, w).clone()


def _subject(colour, h=8, w=8):
    """A 4x4 patch of `colour` on white."""
    img = torch.ones(3, h, w)
    img[:, 2:6, 2:6] = torch.tensor(colour)[:, None, None]
    return img


def test_the_histogram_is_a_distribution_over_the_bins_the_colours_fall_in():
    pixels = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.1, -0.6, 0.9]])
    h = colour_histogram(pixels, bins=4)
    assert h.shape == (64,) and float(h.sum()) == pytest.approx(1.0)
    # black -> bin (0,0,0); white -> (3,3,3) twice; (0.1,-0.6,0.9) -> (2,0,3)
    assert h[0] == 0.25 and h[63] == 0.5 and h[(2 * 4 + 0) * 4 + 3] == 0.25


def test_the_white_backdrop_is_not_the_subject():
    assert subject_pixels(_subject([0.8, -0.8, -0.8])).shape == (16, 3)
    with pytest.raises(ValueError, match="all white"):
        subject_pixels(torch.ones(3, 4, 4))


def test_frames_of_the_subject_colour_are_at_distance_zero_and_other_colours_at_one():
    red, blue = [0.8, -0.8, -0.8], [-0.8, -0.8, 0.8]
    assert colour_distance(_subject(red), _frames(red)) == pytest.approx(0.0, abs=1e-7)
    assert colour_distance(_subject(red), _frames(blue)) == pytest.approx(1.0)


def test_more_of_the_subject_colour_in_the_frames_is_nearer():
    red, grey = [0.8, -0.8, -0.8], [0.0, 0.0, 0.0]
    distances = []
    for rows in (0, 2, 4, 8):
        video = _frames(grey)
        video[:, :, :rows] = torch.tensor(red)[:, None, None, None]
        distances.append(colour_distance(_subject(red), video))
    assert distances == sorted(distances, reverse=True) and distances[0] == pytest.approx(1.0)
    assert distances[-1] == pytest.approx(0.0, abs=1e-7)


def test_latent_distances_tell_a_sample_near_its_own_clip():
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(4, 16, 2, 4, 6, generator=g)
    near = clips + 0.1 * torch.randn(clips.shape, generator=g)
    own, other = latent_distances(near, clips)
    assert own == pytest.approx(0.01, rel=0.2) and other == pytest.approx(2.01, rel=0.2)
    shuffled = latent_distances(near[[1, 0, 3, 2]], clips)
    assert shuffled[0] > shuffled[1]  # each sample now sits at another clip
    with pytest.raises(ValueError, match="N >= 2"):
        latent_distances(near[:1], clips[:1])
