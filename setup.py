"""wanspeed: a DeepSpeed trainer for frozen-backbone Wan2.1 adapters, with fused attention kernels.

`pip install -e .` installs the top-level packages and the `wanspeed` console script.
On a CPU machine whose torch comes from a local wheel, install `torch==2.13.0` first
(`launch/in_venv.sh` does): the ranges below then pull in nothing more.
"""
from glob import glob

from setuptools import setup

PACKAGES = [
    "model", "model.encoders",
    "kernels", "kernels.bench",
    "data",
    "ds_trainer", "ds_trainer.commands",
    "launch",
]

INSTALL_REQUIRES = [
    "torch>=2.6,<2.14",
    "deepspeed>=0.19.3,<0.20",
    "triton>=3.3,<3.10",
    "transformers>=5.0,<6",
    "diffusers>=0.42,<0.43",
    "peft>=0.17,<0.22",
    "decord==0.6.0",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "pycocotools>=2.0.8",
    "imageio>=2.34",
    "imageio-ffmpeg>=0.5",
    "pillow>=10",
    "numpy>=1.26",
    "pyyaml>=6",
    "tqdm>=4.66",
    "wandb>=0.18",
    "matplotlib>=3.8",
    "ninja>=1.11",
]

setup(
    name="wanspeed",
    version="0.1.0",
    description="DeepSpeed trainer for Wan2.1 reference adapters and Self-Forcing, with fused attention kernels",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_data={"kernels": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.h"]},
    # configs/ is not a package: a wheel installs it under <prefix>/share/wanspeed (ds_trainer/shipped.py)
    data_files=[("share/wanspeed/configs", sorted(glob("configs/*.yaml"))),
                ("share/wanspeed/configs/ds", sorted(glob("configs/ds/*.json")))],
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3"]},
    entry_points={"console_scripts": ["wanspeed=ds_trainer.commands:main"]},
)
