"""Shared fixtures: tiny configs, deterministic seeds, float64 tolerances in one place."""
import os

import pytest
import torch

# Triton kernels run in the interpreter on CPU; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances for "fp32 computation vs the same module evaluated in float64".
FP32_VS_FP64 = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("WANSPEED_ATTN_BACKEND", raising=False)
    yield


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
