"""The environment variables every node of a launch must see, and the `.deepspeed_env` file that
carries them.

With ssh, DeepSpeed's runner starts the remote ranks through pdsh with only the variables it
exports: those whose names start with PYTHON, UCX, MV2, MLFLOW or the accelerator's NCCL prefix,
plus every `KEY=VALUE` line of `.deepspeed_env` (looked up in `~` and `.`, or the file `DS_ENV_FILE`
names). Gloo, wandb and our own variables would silently stay on the launching node, so
`wanspeed launch` writes them all into a `.deepspeed_env` of its own and points `DS_ENV_FILE` at
it. Without ssh (`--no_ssh`, one launcher per node) DeepSpeed reads no such file: each node runs
with its own environment (what the scheduler passes, e.g. SLURM's `--export`), and the launcher
adds the `--env` values there itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

EXPORTED_PREFIXES = (
    "NCCL_", "TORCH_NCCL_", "GLOO_",        # interfaces, IB, timeouts, debug output of the collectives
    "WANDB_",                               # project, mode, key, dir: every rank may log
    "WANSPEED_",                            # attention backend, progress bar
    "HF_", "TRANSFORMERS_", "TRITON_",      # model caches, offline mode, kernel caches
    "TORCH_DISTRIBUTED_", "TORCH_CPP_",     # collective debugging
)
EXPORTED_NAMES = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF")
DEEPSPEED_ENV_FILE = ".deepspeed_env"
EXISTING_ENV_FILES = (Path.home() / DEEPSPEED_ENV_FILE, Path(DEEPSPEED_ENV_FILE))
"""Where DeepSpeed looks for a user's own file; its lines are kept in the one we write."""


class EnvFileError(ValueError):
    """A variable that cannot be passed to the other nodes (the message names it)."""


def exported_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` that must reach every node, sorted by name."""
    return {k: environ[k] for k in sorted(environ) if k.startswith(EXPORTED_PREFIXES) or k in EXPORTED_NAMES}


def parse_assignments(items: list[str], origin: str = "--env") -> dict[str, str]:
    """`KEY=VALUE` strings (from --env or the lines of a .deepspeed_env) -> dict; blank lines and
    `#` comments are skipped."""
    out = {}
    for item in items:
        line = item.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise EnvFileError(f"{origin}: expected KEY=VALUE, got {item.strip()!r}")
        out[key.strip()] = value
    return out


def read_env_file(path: Path) -> dict[str, str]:
    return parse_assignments(path.read_text().splitlines(), origin=str(path))


def deepspeed_env(environ: Mapping[str, str], extra: Mapping[str, str],
                  existing: tuple[Path, ...] = EXISTING_ENV_FILES) -> dict[str, str]:
    """What the launch's `.deepspeed_env` holds: a user's existing file(s), then the exported
    variables of `environ`, then `extra` (--env), later ones winning."""
    out: dict[str, str] = {}
    for path in existing:
        if path.is_file():
            out.update(read_env_file(path))
    out.update(exported_variables(environ))
    out.update(extra)
    for key, value in out.items():
        if "\n" in value or "\r" in value:
            raise EnvFileError(f"{key}: a value with a line break cannot go into {DEEPSPEED_ENV_FILE}")
    return out


def write_env_file(path: Path, variables: Mapping[str, str]) -> Path:
    """Write `variables` as DeepSpeed's `KEY=VALUE` lines, readable only by the owner (it may hold
    WANDB_API_KEY)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{k}={v}\n" for k, v in variables.items())
    os.chmod(path, 0o600)
    return path
