"""The loading-report check shared by the transformers-based encoders."""
from __future__ import annotations

from typing import Mapping


def check_loading_info(info: Mapping[str, object], what: str, allowed_unexpected: str = "") -> None:
    """Raise naming the keys transformers reported missing, mis-shaped or unexpected (except
    unexpected keys starting with `allowed_unexpected`, e.g. a deliberately skipped block)."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if kind == "unexpected_keys" and allowed_unexpected:
            keys = [k for k in keys if not k.startswith(allowed_unexpected)]
        if keys:
            raise ValueError(f"{what}: {kind.replace('_', ' ')}: {keys[:5]} ({len(keys)} in all)")
