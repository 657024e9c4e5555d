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


def test_the_cli_lists_every_command_without_importing_them():
    import subprocess
    import sys
    code = ("import sys; from ds_trainer.cli import main, COMMANDS; main(['--help']);"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'deepspeed','transformers','diffusers'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from ds_trainer.cli import COMMANDS
    for name in COMMANDS:
        assert f"  {name}" in out.stdout
    assert out.stdout.strip().endswith("[]")  # --help imported no heavy library
