"""tolaria: a fail-safe watchdog for PyTorch training.

It detects catastrophic failure (non-finite loss, weights or gradients, loss divergence,
collapse to the random-guess loss, gradient explosions) and rolls the model back to its Last
Known Good state. This module is the public API and nothing else.
"""

from tolaria import _ext  # noqa: F401  (honours TOLARIA_REQUIRE_NATIVE at import time)
from tolaria._version import __version__

__all__ = ["__version__"]
