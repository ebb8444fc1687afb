"""tolaria inside the trainers people use, one module per framework.

* :mod:`tolaria.integrations.lightning` — ``TolariaCallback`` for Lightning (``lightning`` or
  ``pytorch_lightning``);
* :mod:`tolaria.integrations.transformers` — ``TolariaCallback`` and ``TolariaTrainer`` for Hugging
  Face's ``Trainer``;
* :mod:`tolaria.integrations.accelerate` — ``TolariaHook`` for loops driven by an ``Accelerator``.

Each module imports its framework itself (``pip install tolaria[lightning]``, ``[transformers]``,
``[accelerate]``); this package imports none of them: ``tolaria.integrations.lightning`` (the
attribute) imports that module on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_FRAMEWORKS = ("accelerate", "lightning", "transformers")


def __getattr__(name: str) -> ModuleType:
    if name in _FRAMEWORKS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_FRAMEWORKS)
