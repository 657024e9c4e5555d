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


ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONUSERBASE")}  # nothing points at the tree
CHECK = ("from ds_trainer.shipped import configs_dir; import json; d = configs_dir(); "
         "print(d); json.loads((d / 'ds' / 'zero3.json').read_text()); (d / 'tiny_opens2v.yaml').read_text()")


def _run(*cmd, cwd, env=ENV):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in place would leave build/ and *.egg-info in the tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "outputs", "wandb",
                                                             "__pycache__", "*.egg-info"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "wh"),
         str(src), cwd=tmp)
    return next((tmp / "wh").glob("wanspeed-*.whl"))


@pytest.mark.slow
def test_a_wheel_install_ships_the_configs(wheel, tmp_path):
    _run(sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv"), cwd=tmp_path)
    # --ignore-installed: without it pip first uninstalls the wanspeed this interpreter runs (editable)
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--prefix",
         str(tmp_path / "venv"), str(wheel), cwd=tmp_path)
    found = _run(str(tmp_path / "venv" / "bin" / "python"), "-I", "-c", CHECK, cwd=tmp_path).strip()
    assert found == str(tmp_path / "venv" / "share" / "wanspeed" / "configs")


@pytest.mark.slow
def test_a_user_install_finds_its_configs_under_the_user_base(wheel, tmp_path):
    """`pip install --user` puts data_files under the user base (~/.local/share/...), not sys.prefix."""
    base = Path(getattr(sys, "_base_executable", sys.executable))  # the interpreter under this venv
    probe = subprocess.run([str(base), "-c", "import ds_trainer"], capture_output=True, cwd=tmp_path, env=ENV)
    if probe.returncode == 0:
        pytest.skip(f"{base} already imports a wanspeed of its own")
    env = dict(ENV, PYTHONUSERBASE=str(tmp_path / "userbase"))
    _run(str(base), "-m", "pip", "install", "--user", "--no-deps", "--no-warn-script-location", "-q", str(wheel),
         cwd=tmp_path, env=env)
    found = _run(str(base), "-c", CHECK, cwd=tmp_path, env=env).strip()
    assert found == str(tmp_path / "userbase" / "share" / "wanspeed" / "configs")
