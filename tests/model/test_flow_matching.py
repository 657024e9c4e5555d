"""Flow-matching schedule: the shift warp, noising, target and x0 recovery."""
import torch

from model.flow_matching import FlowMatchingScheduler, shift_sigmas


def test_shift_warp_formula_and_grid():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(s, 5.0), 5 * s / (1 + 4 * s))
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)
    sch = FlowMatchingScheduler(shift=5.0)
    assert sch.sigmas.shape == (1000,) and sch.sigmas[0] == 1.0 and 0 < sch.sigmas[-1] < 0.01
    assert (sch.sigmas[1:] < sch.sigmas[:-1]).all()
    torch.testing.assert_close(sch.timesteps, sch.sigmas * 1000)
    # Self-Forcing's warped step list: [1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625]
    warped = torch.cat([sch.timesteps, torch.zeros(1, dtype=torch.float64)])[1000 - torch.tensor([1000, 750, 500, 250])]
    torch.testing.assert_close(warped, torch.tensor([1000.0, 937.5, 833.333, 625.0], dtype=torch.float64), atol=1e-2, rtol=0)


def test_add_noise_target_and_x0_are_consistent():
    sch = FlowMatchingScheduler(shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    sigma = sch.sample_sigmas(2, generator=g)
    x_t = sch.add_noise(x0, eps, sigma)
    torch.testing.assert_close(x_t[1], (1 - sigma[1]) * x0[1] + sigma[1] * eps[1])
    flow = sch.training_target(x0, eps)
    torch.testing.assert_close(sch.x0_from_flow(x_t, flow, sigma), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sch.sigma_of(sch.timestep(sigma)), sigma)


def test_per_frame_sigmas_broadcast_per_frame():
    sch = FlowMatchingScheduler()
    x0, eps = torch.zeros(1, 2, 3, 1, 1), torch.ones(1, 2, 3, 1, 1)
    sigma = torch.tensor([[0.1, 0.5, 0.9]])
    torch.testing.assert_close(sch.add_noise(x0, eps, sigma)[0, 0, :, 0, 0], sigma[0])
    assert sch.sample_sigmas(4, frames=3).shape == (4, 3)


def test_euler_sampler_with_the_exact_velocity_recovers_x0():
    sch = FlowMatchingScheduler(shift=5.0)
    x0, eps = torch.randn(1, 4, 1, 2, 2), torch.randn(1, 4, 1, 2, 2)
    sigmas = sch.sampling_sigmas(4)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    x = eps.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = sch.euler_step(x, eps - x0, s.expand(1), s_next.expand(1))
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)
