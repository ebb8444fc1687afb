"""The one place that imports the compiled extension ``tolaria._C``.

Everything else asks this module whether the native engine exists and why not. The import
error is kept and raised only when the compiled path is actually required: explicitly
(``require_extension()``) or for the whole process with ``TOLARIA_REQUIRE_NATIVE=1``, which
CI sets so that a silently missing build cannot pass as a green run.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

REQUIRE_NATIVE_ENV = "TOLARIA_REQUIRE_NATIVE"

_extension: ModuleType | None
_unavailable_reason: str | None

try:
    from tolaria import _C as _compiled
except ImportError as exc:  # not built (pure-Python install) or built for another Python
    _extension = None
    _unavailable_reason = f"tolaria._C could not be imported ({exc}); the pure-PyTorch paths are used"
else:
    _extension = _compiled
    _unavailable_reason = None


def env_flag(value: str | None) -> bool:
    """How tolaria reads an on/off environment variable: 1, true, yes or on (any case)."""
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly). Read
    here, below every other module, so the kernels and the backend choice share one answer."""
    return env_flag(os.environ.get("TRITON_INTERPRET"))


def native_required() -> bool:
    """True when ``TOLARIA_REQUIRE_NATIVE`` asks for the compiled extension."""
    return env_flag(os.environ.get(REQUIRE_NATIVE_ENV))


def extension() -> ModuleType | None:
    """The compiled module, or None when it is unavailable (see :func:`unavailable_reason`)."""
    return _extension


def compiled(name: str) -> Any:
    """The extension's function ``name``, or None: no extension, or one built before ``name``
    existed (a stale build). Callers look it up once at import and fall back to their Python
    twins on None."""
    return getattr(_extension, name, None)


def unavailable_reason() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    return _unavailable_reason


def require_extension() -> ModuleType:
    """Return the compiled module; raises ImportError carrying the reason when it is missing."""
    if _extension is None:
        raise ImportError(f"tolaria's compiled extension is required but unavailable: {_unavailable_reason}")
    return _extension


def build_info() -> dict[str, Any] | None:
    """``_C.build_info()``, or None without the extension."""
    return dict(_extension.build_info()) if _extension is not None else None


def cuda_runtime_usable() -> bool:
    """True when the extension was built with CUDA and a driver with a device is present."""
    return bool(_extension is not None and _extension.cuda_runtime_available())


if _extension is None and native_required():
    raise ImportError(
        f"{REQUIRE_NATIVE_ENV}=1 but tolaria's compiled extension is unavailable: {_unavailable_reason}. "
        "Rebuild with `pip install -e .` (see README) or unset the variable to use the pure-PyTorch paths."
    )
