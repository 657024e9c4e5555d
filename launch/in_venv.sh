#!/usr/bin/env bash
# Run a command inside the repository's virtual environment, creating and filling it first.
#
#   bash launch/in_venv.sh wanspeed demo
#   bash launch/in_venv.sh python -m pytest -q tests
#
# The venv lives in .venv at the repository root. It is (re)installed when setup.py changes.
# torch is pinned here, not in setup.py: on CPU machines the local CPU wheel of this exact
# version is on pip's find-links, and an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WANSPEED_VENV:-$ROOT/.venv}"
TORCH_PIN="${WANSPEED_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"

stamp_of() { cat "$ROOT/setup.py" "$ROOT/launch/in_venv.sh" | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "[wanspeed] creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.wanspeed-stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
    echo "[wanspeed] installing dependencies into $VENV (first run takes a few minutes; log: $VENV/install.log)" >&2
    if ! { "$VENV/bin/python" -m pip install --upgrade pip setuptools wheel \
           && "$VENV/bin/python" -m pip install "$TORCH_PIN" \
           && "$VENV/bin/python" -m pip install -e "$ROOT[dev]"; } > "$VENV/install.log" 2>&1; then
        tail -n 40 "$VENV/install.log" >&2
        echo "[wanspeed] installation failed; full log in $VENV/install.log" >&2
        exit 1
    fi
    stamp_of > "$VENV/.wanspeed-stamp"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
cd "$ROOT"
exec "$@"
