"""Our `kernels` package next to transformers/diffusers, with and without Hugging Face's
unrelated `kernels` distribution installed (simulated by a real package + dist-info on disk)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Submodule names of Hugging Face's `kernels`; ours must avoid them (they would shadow each other).
_FOREIGN_SUBMODULES_WE_AVOID = {"layer", "utils", "lockfile", "cli", "compat", "layers", "wheel"}
# What transformers' hub_kernels integration imports from `kernels` when it thinks it is installed.
_HF_NAMES = ["CUDAProperties", "Device", "KernelizeFallback", "LayerRepository", "LocalLayerRepository", "Mode",
             "ROCMProperties", "register_kernel_mapping", "replace_kernel_forward_from_hub", "use_kernel_mapping",
             "get_kernel", "kernelize", "use_kernel_forward_from_hub", "use_kernelized_func"]

CHECK = textwrap.dedent("""
    import importlib, sys
    order = sys.argv[1].split(",")
    for name in order:
        importlib.import_module(name)
    import kernels, transformers, diffusers
    from kernels.attention import multi_path_attention  # ours, whatever the order
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from diffusers import AutoencoderKLWan
    m = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14))
    assert m(torch.zeros(1, 3, 28, 28)).last_hidden_state.shape == (1, 5, 16)
    import transformers.integrations.hub_kernels as hk
    from transformers.utils import is_kernels_available
    print("hf-kernels-available", is_kernels_available())
""")


def _run(order, extra_path=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([str(extra_path)] if extra_path else []))
    proc = subprocess.run([sys.executable, "-c", CHECK, order], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_our_submodules_do_not_collide_with_hf_kernels():
    ours = {p.stem for p in (ROOT / "kernels").iterdir() if p.suffix == ".py" or p.is_dir()}
    assert not ours & _FOREIGN_SUBMODULES_WE_AVOID


@pytest.mark.parametrize("order", ["kernels,transformers,diffusers", "transformers,diffusers,kernels"])
def test_imports_together_without_hf_kernels(order):
    assert "hf-kernels-available False" in _run(order)


def _fake_hf_kernels(site: Path) -> None:
    """A minimal stand-in for Hugging Face `kernels` 0.18.5 installed in `site`."""
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    # each name returns an identity decorator tagged with where it came from
    (pkg / "layer.py").write_text("".join(
        f"def {n}(*a, **k):\n    def deco(f):\n        return f\n    deco.origin = 'hf:{n}'\n    return deco\n"
        for n in _HF_NAMES))
    (pkg / "__init__.py").write_text("__version__ = '0.18.5'\nfrom kernels.layer import *  # noqa\n")
    dist = site / "kernels-0.18.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.5\n")
    (dist / "RECORD").write_text("kernels/__init__.py,,\nkernels/layer.py,,\nkernels-0.18.5.dist-info/METADATA,,\n")


@pytest.mark.parametrize("order", ["kernels,transformers,diffusers", "transformers,diffusers,kernels"])
def test_imports_together_with_hf_kernels_installed_behind_ours(order, tmp_path):
    _fake_hf_kernels(tmp_path)
    out = _run(order, extra_path=tmp_path)
    assert "hf-kernels-available True" in out  # transformers imported all its names through ours


def test_forwarded_names_come_from_the_other_package(tmp_path):
    _fake_hf_kernels(tmp_path)
    code = ("import kernels, kernels.attention; from kernels import get_kernel; from kernels.layer import kernelize;"
            "print(get_kernel().origin, kernelize().origin, kernels.attention.__name__)")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hf:get_kernel", "hf:kernelize", "kernels.attention"]
