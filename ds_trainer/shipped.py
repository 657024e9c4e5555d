"""Where the shipped configs live: `configs/` of the source tree (a clone or an editable install),
else the copy a wheel installs under `<prefix>/share/wanspeed/configs` (setup.py `data_files`)."""
from __future__ import annotations

import sys
from pathlib import Path

SOURCE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
INSTALLED_CONFIGS = Path(sys.prefix) / "share" / "wanspeed" / "configs"


def configs_dir(candidates: tuple[Path, ...] = (SOURCE_CONFIGS, INSTALLED_CONFIGS)) -> Path:
    """The first candidate holding the DeepSpeed configs (`ds/`), or an error naming each place."""
    for candidate in candidates:
        if (candidate / "ds").is_dir():
            return candidate
    raise FileNotFoundError("wanspeed's configs are in none of: " + ", ".join(str(c) for c in candidates)
                            + " (reinstall wanspeed, or run from a clone)")
