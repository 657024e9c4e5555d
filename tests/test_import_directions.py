"""design.md's dependency directions, enforced by reading every import statement."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"model", "kernels", "data", "ds_trainer", "launch"}
FORBIDDEN = {
    "kernels": {"model", "data", "ds_trainer", "launch"},
    "model": {"data", "ds_trainer", "launch"},
    "data": {"ds_trainer", "launch"},
    "launch": {"ds_trainer", "data"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package])
           for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def _imports_argparse(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "argparse":
            return True
    return False


def test_only_the_commands_package_parses_arguments():
    """Every option of every `wanspeed` command lives in ds_trainer/commands/; library modules
    take plain arguments. (launch/ holds no Python CLI yet, so nothing is exempt.)"""
    commands = ROOT / "ds_trainer" / "commands"
    parsing = sorted(str(p.relative_to(ROOT)) for package in OURS for p in (ROOT / package).rglob("*.py")
                     if commands not in p.parents and _imports_argparse(p))
    assert parsing == []
    assert _imports_argparse(commands / "train.py")  # the check sees an argparse import where there is one


def test_every_command_has_its_module_in_the_commands_package():
    from ds_trainer.commands import COMMANDS, command_module
    for name in COMMANDS:
        module = command_module(name)
        assert module.__name__.startswith("ds_trainer.commands.") and callable(module.add_arguments)
        assert callable(module.run)


def test_the_cli_lists_every_command_without_importing_them():
    import subprocess
    import sys
    code = ("import sys; from ds_trainer.commands import main, COMMANDS; main(['--help']);"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch','deepspeed','transformers','diffusers'}"
            " or m.startswith('ds_trainer.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from ds_trainer.commands import COMMANDS
    for name in COMMANDS:
        assert f"  {name}" in out.stdout
    assert out.stdout.strip().endswith("[]")  # --help imported no heavy library and no command module


def test_the_wanspeed_console_script_runs_the_dispatcher():
    import shutil
    import subprocess
    import sys
    script = shutil.which("wanspeed", path=str(Path(sys.executable).parent))
    assert script, "wanspeed console script not installed next to this interpreter (pip install -e .)"
    out = subprocess.run([script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "make-demo-data" in out.stdout, out.stderr
    assert "ds_trainer.commands" in Path(script).read_text()


def test_constants_kernels_cannot_import_equal_model_configs():
    """kernels/ imports nothing of ours, so its benchmarks restate two token counts: keep them equal."""
    from kernels.bench import fused_cross_attention as bench
    from model import config
    assert (bench.T5_TOKENS, bench.CLIP_TOKENS) == (config.T5_TOKENS, config.CLIP_TOKENS)
