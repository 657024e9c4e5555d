"""A wheel (non-editable) install finds the shipped configs; without them the error names where it looked."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_trainer.shipped import SOURCE_CONFIGS, configs_dir

ROOT = Path(__file__).resolve().parents[1]


def test_configs_come_from_the_source_tree_in_a_clone():
    assert configs_dir() == SOURCE_CONFIGS and (SOURCE_CONFIGS / "ds" / "zero3.json").is_file()


def test_missing_configs_are_an_error_naming_each_place(tmp_path):
    with pytest.raises(FileNotFoundError, match="reinstall") as err:
        configs_dir((tmp_path / "a", tmp_path / "b"))
    assert str(tmp_path / "a") in str(err.value) and str(tmp_path / "b") in str(err.value)


@pytest.mark.slow
def test_a_wheel_install_ships_the_configs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may point at the source tree

    def run(*cmd):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "outputs", "wandb",
                                                             "__pycache__", "*.egg-info"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wh"),
        str(src))
    run(sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv"))
    wheel = next((tmp_path / "wh").glob("wanspeed-*.whl"))
    # --ignore-installed: without it pip first uninstalls the wanspeed this interpreter runs (editable)
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--prefix",
        str(tmp_path / "venv"), str(wheel))
    code = ("from ds_trainer.shipped import configs_dir; import json; d = configs_dir(); "
            "print(d); json.loads((d / 'ds' / 'zero3.json').read_text()); (d / 'tiny_opens2v.yaml').read_text()")
    found = run(str(tmp_path / "venv" / "bin" / "python"), "-I", "-c", code).strip()
    assert found == str(tmp_path / "venv" / "share" / "wanspeed" / "configs")
