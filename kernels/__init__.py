"""wanspeed's attention kernels and the attention backend registry.

Name clash: Hugging Face publishes an unrelated package also imported as `kernels`, and
transformers/diffusers import names from it (`from kernels import get_kernel`) whenever a
distribution called `kernels` is installed. When that package is installed but this one is
first on sys.path, those imports would land here and fail. So this package adds the other one's
directory to its `__path__` (its submodules then resolve) and forwards any attribute it does not
define to the other package's `__init__`, evaluated lazily. Without the other package installed,
nothing of this happens. Our own submodule names must not collide with theirs (see
`_FOREIGN_SUBMODULES_WE_AVOID` in tests/kernels/test_namespace.py).
"""
from __future__ import annotations

import importlib.metadata
import os
from types import SimpleNamespace
from typing import Any, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
_foreign: Optional[SimpleNamespace] = None


def _foreign_package_dir() -> Optional[str]:
    """Directory of another installed distribution's `kernels` package, or None."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.parts[:1] == ("kernels",) and f.name == "__init__.py" and len(f.parts) == 2:
            path = os.path.dirname(os.path.abspath(str(dist.locate_file(f))))
            return None if os.path.samefile(path, _HERE) else path
    return None


def _load_foreign() -> Optional[SimpleNamespace]:
    """Evaluate the other package's `__init__.py` in its own namespace (once)."""
    global _foreign
    if _foreign is None:
        path = _foreign_package_dir()
        namespace: dict[str, Any] = {"__name__": __name__, "__package__": __name__,
                                     "__path__": __path__}
        if path is not None:
            init = os.path.join(path, "__init__.py")
            namespace["__file__"] = init
            with open(init, encoding="utf-8") as fh:
                exec(compile(fh.read(), init, "exec"), namespace)  # noqa: S102
        _foreign = SimpleNamespace(**namespace) if path is not None else SimpleNamespace()
    return _foreign


_other_dir = _foreign_package_dir()
if _other_dir is not None:
    __path__.append(_other_dir)  # noqa: F821  (module __path__ of this package)


def __getattr__(name: str) -> Any:  # PEP 562: only called for names not defined here
    if name.startswith("__"):
        raise AttributeError(name)
    foreign = _load_foreign()
    if hasattr(foreign, name):
        return getattr(foreign, name)
    raise AttributeError(f"module 'kernels' (wanspeed) has no attribute {name!r}")
