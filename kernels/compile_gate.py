"""Compile gate: every Triton kernel at every autotune config, and the CUDA extension, compiled
for Hopper (sm_90) and Blackwell (sm_100) without a GPU; registers, spills and shared memory
from the compiler (`wanspeed bench compile`, tests/kernels/test_compile_gate.py).

Triton compiles for a target with no device attached (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`, its bundled ptxas); this module builds the same signature,
constexprs and pointer-alignment hints a real launch would, runs the compiler with ptxas's `-v`
log captured, and reads registers per thread, stack frame, spill stores / loads from that log
and the shared memory Triton allocates from the kernel's metadata. The extension's `.cu` is
compiled with nvcc (`-cubin -Xptxas -v`) against torch's headers and read the same way, per
`__global__` instantiation, cross-checked with `cuobjdump --dump-resource-usage`.

Which configs: every config of each kernel's autotune list (`<tuned>.configs`), in every dtype
and architecture. A row is `kept` when the kernel's own early prune (`prune_by_registers`) keeps
it for that architecture: the configs the autotuner may pick. That prune reads the compiler's
verdict from kernels/measured_spills.json, which this gate writes (`--update-table`): per kernel,
architecture, dtype, BLOCK_D and variant, the configs compiled and those within SPILL_BUDGET.
The register estimate the prune falls back on elsewhere is scored against the compiler here too
(`estimate_kept` per row, the disagreements in the summary), since no single threshold on it
separates the configs that spill from those that do not.

Triton is imported lazily: this module is not a Triton kernel file (tests/kernels/test_import_graph.py)
and imports nothing of ours outside kernels/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
RESULTS = ROOT / "bench" / "results"

ARCHS = {"sm_90": 90, "sm_100": 100}
# Max shared memory one block may opt into: 227 KB on compute capability 9.0 and 10.0 (CUDA
# programming guide, "Technical Specifications per Compute Capability").
SMEM_LIMIT = {"sm_90": 227 * 1024, "sm_100": 227 * 1024}
# Spill budget for a config the prune keeps (bytes of spill stores + loads per thread, from
# ptxas). A handful of bytes is ptxas parking a pointer or a loop bound outside the hot loop;
# the heavy cases measured here are 400 to 12000 bytes and sit inside the key loop, where each
# spilled byte is a local-memory round trip per tile. 64 bytes is two 128-bit vectors per
# thread: below the cost of one extra tile load, above every kept config of the tuned lists.
SPILL_BUDGET = 64
# "Heavy" spill for the prune's other direction: a config it drops must spill at least this
# much on some architecture, or the prune dropped a config the compiler had no trouble with.

# Model shapes (compile-time values only: heads and head dim reach the kernels as constexprs;
# lengths are runtime int32 arguments, not specialized).
SHAPES = {"wan-1.3b": dict(heads=12, head_dim=128), "wan-14b": dict(heads=40, head_dim=128)}
DTYPES = ("bf16", "fp16")

# Argument types by name (the three kernel files share these names).
_FP32_PTRS = {"LSE", "DELTA", "VISITS"}
_I32_PTRS = {"LENS0", "LENS1", "LENS2", "LENS3", "WSTART", "WLEN"}
_INTS = {"Lq", "LK0", "LK1", "LK2", "LK3", "GRAD_PATHS", "L", "L0", "FT", "NF", "FPB", "W", "C"}
# SINK is a token count (int) in the block-causal kernels and a [B] int32 tensor in the KV cache
_FLOATS = {"qk_scale", "sm_scale"}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One Triton kernel: its module, the autotuned object there, and the constexpr variants
    the model launches it with (besides heads, head dim and dtype)."""
    name: str
    module: str
    tuned: str
    variants: tuple = ({},)
    i32_ptrs: frozenset = frozenset()   # int32 pointer arguments beyond the shared table

    def resolve(self):
        import importlib  # noqa: PLC0415
        tuned = getattr(importlib.import_module(self.module), self.tuned)
        return tuned.fn, tuned


# fused cross-attention with 3 paths (text, CLIP, VAE reference: the adapter job's default;
# a 4th path adds one more unrolled sweep, no more live state); block-causal in its plain
# (Self-Forcing DMD, no teacher forcing) and its largest (I2V first frame + teacher forcing:
# three key ranges) forms.
_BC = ({"IFF": False, "TF": False}, {"IFF": True, "TF": True})
KERNELS = (
    KernelSpec("fca_fwd", "kernels.fused_cross_attention", "_fwd_tuned", ({"NUM_PATHS": 3},)),
    KernelSpec("fca_bwd_dq", "kernels.fused_cross_attention", "_bwd_dq_tuned", ({"NUM_PATHS": 3},)),
    KernelSpec("fca_bwd_dkdv", "kernels.fused_cross_attention", "_bwd_dkdv_tuned", ({"NUM_PATHS": 3},)),
    KernelSpec("bc_fwd", "kernels.block_causal_attention", "_fwd_tuned", _BC),
    KernelSpec("bc_bwd_dq", "kernels.block_causal_attention", "_bwd_dq_tuned", _BC),
    KernelSpec("bc_bwd_dkdv", "kernels.block_causal_attention", "_bwd_dkdv_tuned", _BC),
    KernelSpec("kv_fwd", "kernels.kv_cache_attention", "_kv_fwd_tuned", i32_ptrs=frozenset({"SINK"})),
)


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: kernel, variant, dtype, architecture, config (BLOCK_M, BLOCK_N, warps, stages)."""
    kernel: str
    variant: tuple          # sorted (name, value) pairs
    dtype: str
    arch: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    kept: bool
    shapes: str = "wan-1.3b"
    estimate_kept: Optional[bool] = None

    @property
    def config(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


def _spec(name: str) -> KernelSpec:
    return next(k for k in KERNELS if k.name == name)


def _constexprs(job_or_spec_variant: dict, dtype: str, shapes: str) -> dict:
    import torch  # noqa: PLC0415
    from kernels.triton_common import tile_constants  # noqa: PLC0415
    shape = SHAPES[shapes]
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    consts = dict(HEADS=shape["heads"], **tile_constants(tdtype, shape["head_dim"], False), **job_or_spec_variant)
    return consts


def configs_for(spec: KernelSpec, variant: dict, dtype: str = "bf16", shapes: str = "wan-1.3b",
                arch: str = "sm_90", measured: bool = True):
    """[(config, kept)] for the kernel's autotune list at these constexprs, `kept` by the
    kernel's own early prune on `arch` (what the autotuner would time there); `measured=False`:
    by the register estimate alone."""
    fn, tuned = spec.resolve()
    consts = _constexprs(variant, dtype, shapes)
    kept = tuned.early_config_prune(tuned.configs, {}, arch=arch, measured=measured, **consts)
    return [(c, any(c is k for k in kept)) for c in tuned.configs]


def prune_estimate(spec: KernelSpec, config, variant: dict, dtype: str = "bf16", shapes: str = "wan-1.3b") -> float:
    """The register prune's estimate for one config (its formula, with the kernel's own live-tile
    counts read from the autotuner's prune): fp32 registers of live tiles per thread."""
    _, tuned = spec.resolve()
    kw = tuned.early_config_prune.keywords
    block_d = _constexprs(variant, dtype, shapes)["BLOCK_D"]
    live = (kw["accumulators"] * config.kwargs[kw["rows"]] * block_d
            + kw["scores"] * config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])
    return live / (32 * config.num_warps)


def jobs(archs: Sequence[str] = tuple(ARCHS), shapes: str = "wan-1.3b", dtypes: Sequence[str] = DTYPES,
         kernels: Optional[Iterable[str]] = None, kept_only: bool = False) -> list[Job]:
    """Every compile of a run: every config of every kernel's list in every dtype and
    architecture (`kept_only`: only those the prune keeps, i.e. what the autotuner may pick)."""
    out = []
    for spec in KERNELS:
        if kernels is not None and spec.name not in kernels:
            continue
        for variant in spec.variants:
            for dtype in dtypes:
                estimate = dict(configs_for(spec, variant, dtype, shapes, measured=False))
                for arch in archs:
                    for cfg, kept in configs_for(spec, variant, dtype, shapes, arch):
                        if kept_only and not kept:
                            continue
                        out.append(Job(spec.name, tuple(sorted(variant.items())), dtype, arch,
                                       cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps,
                                       cfg.num_stages, kept, shapes, estimate[cfg]))
    return out


def _signature(fn, consts: dict, dtype: str, i32_ptrs: frozenset = frozenset()) -> tuple[dict, dict]:
    """Argument types by name and the alignment hints a launch gives (pointers from torch
    allocations are 16-byte aligned; the int arguments are all `do_not_specialize`)."""
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        elif a in _INTS or (a == "SINK" and "SINK" not in i32_ptrs):
            sig[a] = "i32"
        elif a in _FLOATS:
            sig[a] = "fp32"
        else:
            sig[a] = "*fp32" if a in _FP32_PTRS else "*i32" if a in _I32_PTRS | i32_ptrs else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v log -> {function: {registers, stack, spill_stores, spill_loads, static_smem}}."""
    out, cur = {}, None
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            cur = out.setdefault(m.group(1), dict(registers=0, stack=0, spill_stores=0, spill_loads=0,
                                                  static_smem=0))
        elif cur is not None and (m := _PTXAS_FRAME.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _PTXAS_REGS.search(line)):
            cur.update(registers=int(m.group(1)), static_smem=int(m.group(2) or 0))
    return out


def compile_job(job: Job) -> dict:
    """Compile one job for real (Triton's cache bypassed, so ptxas runs and logs every time);
    returns its report row. A compile error is reported in the row (`error`), not raised."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # noqa: PLC0415
    from triton import knobs  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    row = dict(kernel=job.kernel, variant=dict(job.variant), dtype=job.dtype, arch=job.arch, shapes=job.shapes,
               BLOCK_M=job.block_m, BLOCK_N=job.block_n, num_warps=job.num_warps, num_stages=job.num_stages,
               kept=job.kept, estimate_kept=job.estimate_kept)
    fn, _ = _spec(job.kernel).resolve()
    consts = dict(_constexprs(dict(job.variant), job.dtype, job.shapes), BLOCK_M=job.block_m, BLOCK_N=job.block_n)
    if "DEBUG" in fn.arg_names:
        consts["DEBUG"] = False
    sig, attrs = _signature(fn, consts, job.dtype, _spec(job.kernel).i32_ptrs)
    start = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", ARCHS[job.arch], 32),
                               options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    except Exception as exc:  # the row carries the error; check() fails on it
        row.update(error=f"{type(exc).__name__}: {str(exc)[-1500:]}", seconds=round(time.perf_counter() - start, 2))
        return row
    funcs = parse_ptxas(log.getvalue())
    if len(funcs) != 1:
        row.update(error=f"expected one function in the ptxas log, got {sorted(funcs)}:\n{log.getvalue()[-800:]}")
        return row
    (res,) = funcs.values()
    md = k.metadata
    row.update(registers=res["registers"], stack=res["stack"], spill_stores=res["spill_stores"],
               spill_loads=res["spill_loads"], shared=int(md.shared) + res["static_smem"],
               tmem=int(getattr(md, "tmem_size", 0) or 0), seconds=round(time.perf_counter() - start, 2))
    return row


def spill(row: dict) -> int:
    return row.get("spill_stores", 0) + row.get("spill_loads", 0)


def run_jobs(job_list: Sequence[Job], processes: int = 2, progress: bool = False) -> list[dict]:
    """Compile every job, at most `processes` compilers at a time (the machine's cores are shared).

    Always in fresh (spawned) processes with TRITON_INTERPRET unset: a process that has imported
    the kernels under the interpreter (the test suite sets TRITON_INTERPRET=1) holds
    `InterpretedFunction`s, which Triton cannot compile for a GPU target; a forked child would
    inherit them."""
    if not job_list:
        return []
    import multiprocessing  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415
    saved = os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(processes, len(job_list))),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(compile_job, job_list, chunksize=1)
            return list(tqdm(results, total=len(job_list), desc="compiling", unit="kernel", disable=not progress))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


# ----------------------------------------------------------------------------- CUDA extension
_CUOBJ = re.compile(r"Function ([^:\s]+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _tool(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(cuda) / "bin" / name
    return str(path) if path.exists() else None


def _demangle(names: list[str]) -> list[str]:
    tool = _tool("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if res.returncode == 0 and len(out) == len(names) else names


def compile_extension(archs: Sequence[str] = tuple(ARCHS), sources: Optional[Sequence[Path]] = None) -> list[dict]:
    """nvcc every kernels/csrc/*.cu for each architecture (the flags torch's cpp_extension and
    kernels/qk_norm_rope.py use), one row per `__global__` instantiation: ptxas -v figures,
    cross-checked with cuobjdump --dump-resource-usage on the cubin."""
    from torch.utils import cpp_extension  # noqa: PLC0415
    from kernels.qk_norm_rope import CUDA_FLAGS  # noqa: PLC0415  (torch-only module)

    nvcc = _tool("nvcc")
    if nvcc is None:
        return [dict(kernel="extension", arch=a, error="nvcc not found (set CUDA_HOME)") for a in archs]
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:  # the one bundled with Triton
        from triton import knobs  # noqa: PLC0415
        cuobjdump = knobs.nvidia.cuobjdump.path
    sources = list(sources or sorted(CSRC.glob("*.cu")))
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    stub = tempfile.TemporaryDirectory()
    # A CPU torch wheel ships c10/cuda's headers but not the one CMake generates for CUDA builds;
    # its whole content is this define (c10/cuda/impl/cuda_cmake_macros.h.in, shared-library build).
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in cpp_extension.include_paths()):
        (Path(stub.name) / "c10/cuda/impl").mkdir(parents=True)
        (Path(stub.name) / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{stub.name}")
    rows = []
    for src in sources:
        for arch in archs:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                cubin = Path(tmp) / "out.cubin"
                cmd = [nvcc, "-cubin", f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", *cpp_extension.COMMON_NVCC_FLAGS,
                       *CUDA_FLAGS, *includes, "-o", str(cubin), str(src)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                base = dict(kernel=f"ext:{src.name}", arch=arch, seconds=round(time.perf_counter() - start, 2))
                if res.returncode != 0:
                    rows.append(dict(base, error=f"nvcc failed ({res.returncode}):\n{res.stderr[-2000:]}"))
                    continue
                funcs = parse_ptxas(res.stderr + res.stdout)
                usage = {}
                if cuobjdump:
                    dump = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
                    usage = {m.group(1): m for m in _CUOBJ.finditer(dump.stdout)}
            names = sorted(funcs)
            for name, pretty in zip(names, _demangle(names)):
                f = funcs[name]
                row = dict(base, function=pretty, registers=f["registers"], stack=f["stack"],
                           spill_stores=f["spill_stores"], spill_loads=f["spill_loads"], shared=f["static_smem"])
                if name in usage:
                    row["cuobjdump"] = dict(REG=int(usage[name].group(2)), STACK=int(usage[name].group(3)),
                                            SHARED=int(usage[name].group(4)), LOCAL=int(usage[name].group(5)))
                rows.append(row)
            if not names:
                rows.append(dict(base, error="no entry function in the ptxas log"))
    stub.cleanup()
    return rows


# ---------------------------------------------------------------------------------- checking
def fits(row: dict, spill_budget: int = SPILL_BUDGET) -> bool:
    """The compiler's verdict on one row: compiled, within the spill budget and shared memory."""
    return "error" not in row and spill(row) <= spill_budget and row["shared"] <= SMEM_LIMIT[row["arch"]]


def _tag(row: dict) -> str:
    return f"{row['BLOCK_M']}x{row['BLOCK_N']}w{row['num_warps']}s{row['num_stages']}"


def _point(row: dict) -> str:
    """The measured table's key (kernels.triton_common.measured_point builds the same at launch)."""
    block_d = _constexprs({}, row["dtype"], row.get("shapes", "wan-1.3b"))["BLOCK_D"]
    variant = ",".join(f"{k}={int(v)}" for k, v in sorted(row["variant"].items()))
    return f"{row['arch']}/{row['dtype']}/D{block_d}/{variant}"


def measured_table(rows: Sequence[dict], spill_budget: int = SPILL_BUDGET) -> dict:
    """kernels/measured_spills.json from compiled rows: per kernel and point, the configs
    compiled, those that fit, and each one's spill bytes."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["kernel"].startswith("ext:") or "error" in r:
            continue
        spec = _spec(r["kernel"])
        entry = out.setdefault(r["kernel"], dict(variant_keys=sorted({k for v in spec.variants for k in v}),
                                                 points={}))
        point = entry["points"].setdefault(_point(r), dict(compiled=[], fit=[], spill={}))
        point["compiled"].append(_tag(r))
        point["spill"][_tag(r)] = spill(r)
        if fits(r, spill_budget):
            point["fit"].append(_tag(r))
    for entry in out.values():
        for point in entry["points"].values():
            point["compiled"].sort()
            point["fit"].sort()
    return dict(about="written by kernels/compile_gate.py (wanspeed bench compile --update-table) from ptxas -v; "
                      "read by kernels/triton_common.prune_by_registers", spill_budget=spill_budget,
                smem_limit=SMEM_LIMIT, kernels=out)


def update_measured_table(rows: Sequence[dict], path: Optional[Path] = None) -> Path:
    """Rewrite the table: the points compiled in `rows` replaced, every other point kept."""
    from kernels import triton_common  # noqa: PLC0415
    path = Path(path) if path else triton_common.MEASURED_SPILLS
    table = measured_table(rows)
    try:
        old = json.loads(path.read_text())["kernels"]
    except FileNotFoundError:
        old = {}
    for kernel, entry in old.items():
        merged = table["kernels"].setdefault(kernel, entry)
        for point, verdict in entry["points"].items():
            merged["points"].setdefault(point, verdict)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    if path == triton_common.MEASURED_SPILLS:
        triton_common._measured_table.cache_clear()
    return path


def refresh_kept(rows: Sequence[dict]) -> None:
    """Recompute each row's `kept` with the prune as it stands (after a table update)."""
    for r in rows:
        if r["kernel"].startswith("ext:"):
            continue
        kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c, k in configs_for(_spec(r["kernel"]), r["variant"], r["dtype"], r.get("shapes", "wan-1.3b"),
                                        r["arch"]) if k}
        r["kept"] = (r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"]) in kept


def check(rows: Sequence[dict], spill_budget: int = SPILL_BUDGET) -> list[str]:
    """Every failure of the gate, as sentences: compile errors; a config the prune keeps (may be
    autotuned) that spills above the budget or needs more shared memory than its architecture
    has; a config the measured table drops that now fits (the table is stale). Extension
    rows: errors, spills above the budget, and ptxas / cuobjdump disagreeing on registers."""
    from kernels.triton_common import _measured_table  # noqa: PLC0415
    table = _measured_table()
    stale = "kernels/measured_spills.json is stale or missing: rerun `wanspeed bench compile --update-table`"
    bad = []
    for r in rows:
        where = f"{r['kernel']} {r.get('variant', '')} {r.get('dtype', '')} {r['arch']} " + (
            f"{r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']}" if "BLOCK_M" in r else r.get("function", ""))
        if "error" in r:
            bad.append(f"{where}: compile error: {r['error']}")
            continue
        if r["kernel"].startswith("ext:"):
            if spill(r) > spill_budget:
                bad.append(f"{where}: {spill(r)} bytes of spill > budget {spill_budget}")
            if "cuobjdump" in r and r["cuobjdump"]["REG"] != r["registers"]:
                bad.append(f"{where}: ptxas says {r['registers']} registers, cuobjdump {r['cuobjdump']['REG']}")
            continue
        if r["kept"]:
            if r["shared"] > SMEM_LIMIT[r["arch"]]:
                bad.append(f"{where}: kept config needs {r['shared']} B shared memory > {SMEM_LIMIT[r['arch']]} B; {stale}")
            if spill(r) > spill_budget:
                bad.append(f"{where}: kept config spills {spill(r)} B (stores {r['spill_stores']}, loads "
                           f"{r['spill_loads']}) > budget {spill_budget}; {stale}")
        else:
            point = table.get(r["kernel"], {}).get("points", {}).get(_point(r))
            if point and _tag(r) in point["compiled"] and fits(r, spill_budget):
                bad.append(f"{where}: dropped by the measured table but now compiles within budget "
                           f"({spill(r)} B spill); {stale}")
    return bad


# ------------------------------------------------------------------------------------ output
def _versions() -> dict:
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415
    out = dict(torch=torch.__version__, triton=triton.__version__)
    for arch, cap in ARCHS.items():
        try:
            v = subprocess.run([get_ptxas(cap).path, "--version"], capture_output=True, text=True).stdout
            out[f"ptxas_{arch}"] = v.strip().splitlines()[-1]
        except Exception as exc:  # noqa: BLE001
            out[f"ptxas_{arch}"] = f"unknown ({exc})"
    nvcc = _tool("nvcc")
    if nvcc:
        out["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return out


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per (kernel, variant, arch): configs kept / compiled, register range, worst kept spill,
    max kept shared memory, spills of the dropped ones."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" in r or r["kernel"].startswith("ext:"):
            continue
        groups.setdefault((r["kernel"], json.dumps(r["variant"], sort_keys=True), r["arch"]), []).append(r)
    out = []
    for (kernel, variant, arch), rs in groups.items():
        kept = [r for r in rs if r["kept"]]
        drop = [r for r in rs if not r["kept"]]
        cfgs = lambda xs: len({(r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"]) for r in xs})  # noqa: E731
        out.append(dict(kernel=kernel, variant=json.loads(variant), arch=arch, kept=cfgs(kept), dropped=cfgs(drop),
                        kept_registers=[min((r["registers"] for r in kept), default=0), max((r["registers"] for r in kept), default=0)],
                        kept_max_spill=max((spill(r) for r in kept), default=0),
                        kept_spilling=cfgs([r for r in kept if spill(r) > 0]),
                        kept_max_shared=max((r["shared"] for r in kept), default=0),
                        dropped_min_spill=min((spill(r) for r in drop), default=None),
                        estimate_kept_spilling=cfgs([r for r in rs if r.get("estimate_kept") and not fits(r)]),
                        estimate_dropped_fitting=cfgs([r for r in rs if r.get("estimate_kept") is False and fits(r)])))
    return out


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table, one line per compile (Triton) or per instantiation (extension)."""
    lines = ["| kernel | variant | dtype | arch | config | kept | regs | spill st/ld (B) | stack | smem (KB) | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        var = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r.get("variant", {}).items())
        cfg = (f"{r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']}" if "BLOCK_M" in r
               else r.get("function", ""))
        if "error" in r:
            lines.append(f"| {r['kernel']} | {var} | {r.get('dtype', '')} | {r['arch']} | {cfg} | | ERROR | | | | |")
            continue
        lines.append(f"| {r['kernel']} | {var} | {r.get('dtype', '')} | {r['arch']} | {cfg} | "
                     f"{'yes' if r.get('kept', True) else 'no'} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['stack']} | {r['shared'] / 1024:.1f} | {r.get('seconds', '')} |")
    return "\n".join(lines)


def format_summary(summary: Sequence[dict]) -> str:
    lines = ["| kernel | variant | arch | kept / compiled | regs (kept) | max spill kept (B) | kept that spill | "
             "max smem kept (KB) | min spill dropped (B) | estimate: kept but spill / dropped but fit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        var = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in s["variant"].items())
        lines.append(f"| {s['kernel']} | {var} | {s['arch']} | {s['kept']} / {s['kept'] + s['dropped']} | "
                     f"{s['kept_registers'][0]}-{s['kept_registers'][1]} | {s['kept_max_spill']} | {s['kept_spilling']} | "
                     f"{s['kept_max_shared'] / 1024:.1f} | {'' if s['dropped_min_spill'] is None else s['dropped_min_spill']} | "
                     f"{s.get('estimate_kept_spilling', '')} / {s.get('estimate_dropped_fitting', '')} |")
    return "\n".join(lines)


def compile_gate(archs: Sequence[str] = tuple(ARCHS), shapes: str = "wan-1.3b", dtypes: Sequence[str] = DTYPES,
                 kernels: Optional[Iterable[str]] = None, kept_only: bool = False, extension: bool = True,
                 processes: int = 2, out: Optional[Path] = None, progress: bool = False,
                 update_table: bool = False) -> dict:
    """The full gate: compile, check, and write JSON (default kernels/bench/results/compile-<shapes>.json).
    `update_table`: also rewrite kernels/measured_spills.json from these rows (merged with the
    points it already holds that this run did not compile) before checking.
    Returns the report dict (rows, extension rows, summary, failures, seconds)."""
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}; available: {sorted(ARCHS)}")
    if set(dtypes) - set(DTYPES) or not dtypes:
        raise ValueError(f"dtypes must be among {list(DTYPES)}, got {list(dtypes)}")
    if shapes not in SHAPES:
        raise ValueError(f"unknown shape set {shapes!r}; available: {sorted(SHAPES)}")
    start = time.perf_counter()
    rows = run_jobs(jobs(archs, shapes, dtypes, kernels, kept_only), processes, progress)
    if update_table:
        update_measured_table(rows)
        refresh_kept(rows)
    ext = compile_extension(archs) if extension else []
    report = dict(device="cpu (compile only, no GPU)", versions=_versions(), shapes=dict(name=shapes, **SHAPES[shapes]),
                  archs=list(archs), dtypes=list(dtypes), processes=processes,
                  spill_budget=SPILL_BUDGET, smem_limit=SMEM_LIMIT,
                  seconds=round(time.perf_counter() - start, 1), summary=summarize(rows),
                  failures=check(list(rows) + ext), rows=rows, extension=ext)
    path = Path(out) if out else RESULTS / f"compile-{shapes}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(format_report(report))
    report["path"] = str(path)
    return report


def format_report(report: dict) -> str:
    """The markdown written beside the JSON: versions, budgets, the summary, every row."""
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    failures = "\n".join(f"- {f}" for f in report["failures"]) or "none"
    return (f"# Compile gate, {report['shapes']['name']} shapes ({report['device']})\n\n"
            f"{versions}. Spill budget for a kept config: {report['spill_budget']} B; shared memory limit: "
            f"{report['smem_limit']}. {len(report['rows']) + len(report['extension'])} compiles in "
            f"{report['seconds']} s with {report['processes']} processes.\n\nFailures: {failures}\n\n"
            f"## Per kernel and architecture\n\n{format_summary(report['summary'])}\n\n"
            f"## Every compile\n\n{format_table(report['rows'] + report['extension'])}\n")
