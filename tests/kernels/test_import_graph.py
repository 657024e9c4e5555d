"""kernels/ imports run one way: registry (attention.py) -> Triton kernel files -> shared Triton
plumbing (triton_common.py), with torch-only modules (types, layouts, references) importable
from anywhere and importing no Triton. Read from every import statement with `ast`, then
checked by importing for real in a fresh interpreter."""
import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
REGISTRY = "kernels.attention"
SHARED = "kernels.triton_common"
# Imported by the registry at import time, by the model without Triton, and by the kernel files.
TORCH_ONLY = {"kernels.attention_types", "kernels.multi_path_reference", "kernels.block_causal_layout"}


@dataclass
class Imports:
    """What one module imports: `top` at import time, `lazy` inside functions. Names are our
    modules ("kernels.x") and "triton" for any triton import."""

    top: set = field(default_factory=set)
    lazy: set = field(default_factory=set)

    @property
    def all(self) -> set:
        return self.top | self.lazy


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str) -> str:
    """The longest prefix of a dotted name that is a module or package under kernels/."""
    parts = name.split(".")
    while parts:
        base = ROOT.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return name


def parse_imports(source: str, module: str) -> Imports:
    found = Imports()

    def add(name: str, lazy: bool) -> None:
        root = name.split(".")[0]
        if root == "triton":
            (found.lazy if lazy else found.top).add("triton")
        elif root == "kernels":
            (found.lazy if lazy else found.top).add(_resolve(name))

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, lazy)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of `module`
                package = module.split(".")[:len(module.split(".")) - node.level]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from kernels import x` may name the submodule kernels.x
                add(f"{base}.{alias.name}", lazy)
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(ast.parse(source), False)
    return found


def kernels_graph() -> dict[str, Imports]:
    return {_module_name(p): parse_imports(p.read_text(), _module_name(p)) for p in sorted(KERNELS.rglob("*.py"))}


def find_cycle(edges: dict[str, set]) -> Optional[list[str]]:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def dfs(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := dfs(start, [start])):
            return found
    return None


def violations(graph: dict[str, Imports]) -> list[str]:
    """Every broken arrow, as sentences."""
    bad = []
    kernel_files = {m for m, imp in graph.items() if "triton" in imp.top and m != SHARED}
    for m, imp in sorted(graph.items()):
        ours = {n for n in imp.all if n.startswith("kernels.")} - {m}
        if REGISTRY in ours:
            bad.append(f"{m} imports the registry {REGISTRY} (only callers outside kernels/ may)")
        if m in kernel_files and ours & kernel_files:
            bad.append(f"Triton kernel file {m} imports Triton kernel file(s) {sorted(ours & kernel_files)}")
        if m in kernel_files and ours - TORCH_ONLY - {SHARED}:
            bad.append(f"Triton kernel file {m} imports {sorted(ours - TORCH_ONLY - {SHARED})}; "
                       f"it may import only {SHARED} and torch-only modules")
        if m == SHARED and ours:
            bad.append(f"{SHARED} imports {sorted(ours)}; it must import nothing of ours")
        if m in TORCH_ONLY and ("triton" in imp.all or ours - TORCH_ONLY):
            bad.append(f"torch-only module {m} imports {sorted((ours - TORCH_ONLY) | (imp.all & {'triton'}))}")
        if m == REGISTRY and ("triton" in imp.top or (imp.top & kernel_files)):
            bad.append(f"{REGISTRY} imports Triton at import time: {sorted(imp.top & (kernel_files | {'triton'}))}")
    edges = {m: {n for n in imp.all if n in graph and n != m} for m, imp in graph.items()}
    cycle = find_cycle(edges)
    if cycle:
        bad.append("import circle: " + " -> ".join(cycle))
    return bad


# ---- the real tree -----------------------------------------------------------------------
def test_the_modules_the_rules_name_exist_and_are_classified():
    graph = kernels_graph()
    assert {REGISTRY, SHARED, *TORCH_ONLY} <= set(graph)
    kernel_files = {m for m, imp in graph.items() if "triton" in imp.top and m != SHARED}
    assert kernel_files == {"kernels.fused_cross_attention", "kernels.block_causal_attention",
                            "kernels.kv_cache_attention"}
    assert graph["kernels.fused_cross_attention"].top >= {SHARED, "kernels.attention_types"}  # parsing works
    assert graph[REGISTRY].lazy >= kernel_files  # the registry reaches each kernel, lazily


def test_imports_run_one_way():
    assert violations(kernels_graph()) == []


@pytest.mark.parametrize("modules", ["kernels.attention", "model.causal, model.kv_cache",
                                     ", ".join(sorted(TORCH_ONLY))])
def test_registry_torch_only_modules_and_causal_model_import_no_triton(modules):
    code = f"import sys, {modules}; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---- the checker fails on what it must catch -----------------------------------------------
def _graph(**sources) -> dict[str, Imports]:
    return {f"kernels.{name}": parse_imports(src, f"kernels.{name}") for name, src in sources.items()}


CLEAN = dict(
    attention="from kernels.attention_types import KVPath\ndef f():\n    from kernels.fused_cross_attention import g\n",
    attention_types="import torch\n",
    multi_path_reference="from kernels.attention_types import KVPath\n",
    block_causal_layout="import torch\n",
    triton_common="import triton\n",
    fused_cross_attention=("import triton\nfrom kernels.triton_common import LOG2E\n"
                           "from .attention_types import KVPath\n"),  # relative imports resolve too
)


def test_checker_accepts_a_clean_graph():
    graph = _graph(**CLEAN)
    assert violations(graph) == []
    assert graph["kernels.fused_cross_attention"].top == {"triton", SHARED, "kernels.attention_types"}
    assert graph["kernels.attention"].lazy == {"kernels.fused_cross_attention"}


@pytest.mark.parametrize("module,source,expect", [
    ("fused_cross_attention", "import triton\nfrom kernels.attention import KVPath\n", "imports the registry"),
    ("kv_cache_attention", "import triton\nfrom kernels.fused_cross_attention import MIN_BLOCK_D\n",
     "imports Triton kernel file"),
    ("attention_types", "import torch\ndef f():\n    import triton.language as tl\n", "torch-only module"),
    ("triton_common", "import triton\nfrom kernels import block_causal_layout\n", "must import nothing of ours"),
    ("attention", "import triton\n", "imports Triton at import time"),
], ids=["kernel->registry", "kernel->kernel", "torch-only->triton", "plumbing->ours", "registry->triton"])
def test_checker_flags_each_broken_arrow(module, source, expect):
    found = violations(_graph(**{**CLEAN, module: source}))
    assert any(expect in v for v in found), found


def test_checker_flags_an_import_circle():
    circle = {**CLEAN, "attention_types": "from kernels.multi_path_reference import x\n"}
    found = violations(_graph(**circle))
    assert any(v.startswith("import circle: kernels.attention_types -> kernels.multi_path_reference") for v in found)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
