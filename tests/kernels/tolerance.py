"""Every tolerance of the test suite, and the one rule for kernels in low precision.

Kernels are checked against a float64 plain-PyTorch truth:

- fp32 inputs: max |error| <= FP32_REL * max(max |truth|, 1).
- fp16 / bf16 inputs (flash-attention's rule): our max |error| against the truth is at most
  FWD_RATIO (outputs) or BWD_RATIO (gradients) times the error of the plain-PyTorch reference
  run in the same low precision, plus the floor LOW_PRECISION_ATOL. The reference's own error
  sets the scale, so the bound follows the shapes and values of each case.

Modules (tests/model) compare an fp32 run with the same module in float64 by
`torch.testing.assert_close(..., **FP32_VS_FP64)`; tests/conftest.py re-exports that for them.
The other `assert_close` tolerances (exact or same-precision comparisons) are named here too,
so that no test file carries a bare tolerance number.
"""
import torch

FP32_REL = 1e-4
FWD_RATIO, BWD_RATIO = 2.0, 3.0
LOW_PRECISION_ATOL = 1e-5

FP32_VS_FP64 = dict(rtol=1e-4, atol=1e-5)        # a module in fp32 vs the same module in float64
SDPA_VS_FP64 = dict(rtol=1e-5, atol=1e-6)        # the sdpa backend in fp32 vs the float64 reference
FP32_REORDERED = dict(rtol=1e-4, atol=1e-5)      # two fp32 computations that differ in summation order
FP32_ELEMENTWISE = dict(rtol=1e-5, atol=1e-5)    # an fp32 elementwise kernel vs its fp32 reference
FP64_EXACT = dict(rtol=1e-12, atol=1e-12)        # float64 vs float64, the same formula
FP64_GRADS = dict(rtol=1e-10, atol=1e-10)        # float64 gradients through different formulas
LOW_PRECISION_GPU = dict(rtol=2e-2, atol=2e-2)   # bf16 GPU backends vs float64 (flash_attn, sdpa)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 on the CPU; 0 for empty tensors."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def fp32_bound(truth: torch.Tensor) -> float:
    return FP32_REL * max(truth.detach().abs().max().item() if truth.numel() else 0.0, 1.0)


def ratio_bound(plain: torch.Tensor, truth: torch.Tensor, grad: bool) -> float:
    """The low-precision bound: ratio x the plain reference's error + the floor."""
    return (BWD_RATIO if grad else FWD_RATIO) * max_error(plain, truth) + LOW_PRECISION_ATOL


def assert_fp32_close(ours: torch.Tensor, truth: torch.Tensor, what: str = "") -> None:
    err, bound = max_error(ours, truth), fp32_bound(truth)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"


def assert_ratio_rule(ours: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, grad: bool,
                      what: str = "") -> None:
    """`ours` and `plain` (the plain-PyTorch reference) in the same low precision vs `truth`."""
    err, bound = max_error(ours, truth), ratio_bound(plain, truth, grad)
    assert err <= bound, (f"{what}: error {err:.3g} > {BWD_RATIO if grad else FWD_RATIO} x "
                          f"{max_error(plain, truth):.3g} + {LOW_PRECISION_ATOL}")
