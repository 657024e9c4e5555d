"""Shared fixtures: deterministic seeds, the attention-backend variable cleared, the Triton
interpreter on CPU.

Tolerances: the kernels' float64 rule (fp32 relative bound; 2x / 3x the plain-PyTorch error
plus a floor in fp16/bf16) and every tolerance of tests/kernels are in tests/kernels/tolerance.py,
which also defines FP32_VS_FP64 (module in fp32 vs float64), re-exported here because tests/model
imports it from this file. Tests outside tests/kernels still write some one-off `assert_close`
tolerances inline.
"""
import os

import pytest
import torch

# Triton kernels run in the interpreter on CPU; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.kernels.tolerance import FP32_VS_FP64  # noqa: E402,F401  (re-exported for tests/model)


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("WANSPEED_ATTN_BACKEND", raising=False)
    yield


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
