"""Our `kernels` package next to transformers/diffusers, with and without Hugging Face's
unrelated `kernels` distribution installed. transformers >= 5.25 depends on that package, so it
is normally installed: the "without" case hides it (python -S over a copy of site-packages made
of symlinks, all but HF's package), the "behind ours" case puts a stand-in package + dist-info
ahead of it on the path."""
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Submodule names of Hugging Face's `kernels`; ours must avoid them (they would shadow each other).
_FOREIGN_SUBMODULES_WE_AVOID = {"layer", "utils", "lockfile", "cli", "compat", "layers", "wheel",
                                "_internals", "_rust", "benchmark"}
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


def _site_without_hf_kernels(tmp: Path) -> Path:
    """A stand-in for site-packages: a symlink to each entry but Hugging Face's `kernels`."""
    overlay = tmp / "site-without-hf-kernels"
    overlay.mkdir()
    for site in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(site).iterdir():
            hf = entry.name == "kernels" or (entry.name.startswith("kernels-") and entry.name.endswith(".dist-info"))
            if not hf and not (overlay / entry.name).exists():
                (overlay / entry.name).symlink_to(entry)
    return overlay


def _run(order, extra_path=None, site=None):
    """Run CHECK; `site` replaces site-packages (python -S) when given."""
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else []) + ([str(site)] if site else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable] + (["-S"] if site else []) + ["-c", CHECK, order]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _hf_kernels_installed() -> bool:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return dist.metadata["Name"] == "kernels" and any(f.parts[:1] == ("kernels",) for f in dist.files or ())


def test_our_submodules_do_not_collide_with_hf_kernels():
    ours = {p.stem for p in (ROOT / "kernels").iterdir() if p.suffix == ".py" or p.is_dir()}
    assert not ours & _FOREIGN_SUBMODULES_WE_AVOID
    if _hf_kernels_installed():  # and none of the installed release's own modules
        theirs = {f.parts[1].split(".")[0] for f in importlib.metadata.distribution("kernels").files or ()
                  if f.parts[:1] == ("kernels",) and len(f.parts) >= 2 and f.parts[1] != "__init__.py"}
        assert not ours & (theirs - {"__pycache__"}), ours & theirs


@pytest.mark.parametrize("order", ["kernels,transformers,diffusers", "transformers,diffusers,kernels"])
def test_imports_together_without_hf_kernels(order, tmp_path):
    assert "hf-kernels-available False" in _run(order, site=_site_without_hf_kernels(tmp_path))


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed here")
@pytest.mark.parametrize("order", ["kernels,transformers,diffusers", "transformers,diffusers,kernels"])
def test_imports_together_with_the_installed_hf_kernels(order):
    """The usual case since transformers 5.25 (it depends on `kernels`): both packages work."""
    assert "hf-kernels-available True" in _run(order)


def _accepted_hf_kernels_version() -> str:
    """The lowest `kernels` release the installed transformers accepts."""
    from transformers.utils import import_utils  # noqa: PLC0415
    return getattr(import_utils, "KERNELS_MIN_VERSION", "0.18.5")


def _fake_hf_kernels(site: Path) -> None:
    """A minimal stand-in for Hugging Face `kernels` installed in `site`, at a version the
    installed transformers accepts."""
    version = _accepted_hf_kernels_version()
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    # each name returns an identity decorator tagged with where it came from
    (pkg / "layer.py").write_text("".join(
        f"def {n}(*a, **k):\n    def deco(f):\n        return f\n    deco.origin = 'hf:{n}'\n    return deco\n"
        for n in _HF_NAMES))
    (pkg / "__init__.py").write_text(f"__version__ = '{version}'\nfrom kernels.layer import *  # noqa\n")
    dist = site / f"kernels-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (dist / "RECORD").write_text(f"kernels/__init__.py,,\nkernels/layer.py,,\nkernels-{version}.dist-info/METADATA,,\n")


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
