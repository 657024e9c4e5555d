"""Where the shipped configs live: `configs/` of the source tree (a clone or an editable install),
else the copy a wheel installs under `<scheme data>/share/wanspeed/configs` (setup.py
`data_files`): `sys.prefix` for a venv or system install, `~/.local` for `pip install --user`,
any `--prefix`; the installed distribution's file list says which."""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Optional

SOURCE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
INSTALLED_CONFIGS = Path(sys.prefix) / "share" / "wanspeed" / "configs"
MARKER = "share/wanspeed/configs/ds/zero3.json"


def installed_configs(distribution: str = "wanspeed") -> Optional[Path]:
    """The configs directory the installed `distribution` recorded in its RECORD, if any."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(MARKER):
            return Path(f.locate()).resolve().parents[1]
    return None


def configs_dir(candidates: Optional[tuple[Path, ...]] = None) -> Path:
    """The first candidate holding the DeepSpeed configs (`ds/`), or an error naming each place."""
    if candidates is None:
        candidates = (SOURCE_CONFIGS, INSTALLED_CONFIGS) + tuple(p for p in [installed_configs()] if p)
    for candidate in candidates:
        if (candidate / "ds").is_dir():
            return candidate
    raise FileNotFoundError("wanspeed's configs are in none of: " + ", ".join(str(c) for c in candidates)
                            + " (reinstall wanspeed, or run from a clone)")
