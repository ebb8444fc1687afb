"""Is the model sick? One call checks many tensors for NaN/Inf and measures their L2 norms.

:func:`check_tensors` (:mod:`~tolaria.health.dispatch`) runs the fused Triton kernel
(:mod:`~tolaria.health.plan`, :mod:`~tolaria.health.triton_kernels`) or the pure-PyTorch
reference (:mod:`~tolaria.health.reference`), which is also the oracle the kernel is tested
against. The kernel modules are imported on first use only, so this package imports and works
without Triton and without a GPU. This package face only hands names on.
"""

from tolaria.health.dispatch import BACKENDS, check_tensors, host_backend
from tolaria.health.reference import reference_check
from tolaria.health.report import HealthHandle, HealthReport

__all__ = [
    "BACKENDS",
    "HealthHandle",
    "HealthReport",
    "check_tensors",
    "host_backend",
    "reference_check",
]
