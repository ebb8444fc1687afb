"""Is the model sick? One call checks many tensors for NaN/Inf and measures their L2 norms.

``check_tensors`` dispatches to the fused Triton kernel (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``) or to the pure-PyTorch reference, which is also the oracle the kernel is
tested against. The kernel module is imported on first use only, so this package imports and
works without Triton and without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Literal, overload

import torch

from tolaria.health.reference import reference_check, validate_tensors
from tolaria.health.report import HealthHandle, HealthReport, ReadyHealth, build_report

BACKENDS = ("auto", "triton", "reference")

_plan_module: ModuleType | None = None
_triton_error: str | None = None


def _load_plan_module() -> ModuleType | None:
    """Import the Triton path once; remember why it failed so ``backend='triton'`` can say."""
    global _plan_module, _triton_error
    if _plan_module is None and _triton_error is None:
        try:
            from tolaria.health import plan

            _plan_module = plan
        except Exception as error:  # ImportError, or a Triton that fails while initializing
            _triton_error = f"{type(error).__name__}: {error}"
    return _plan_module


def triton_status() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and why not (for ``tolaria doctor``)."""
    if _load_plan_module() is None:
        return False, f"triton unavailable ({_triton_error})"
    from tolaria.health import triton_kernels

    mode = (
        "interpreter (TRITON_INTERPRET=1: CPU tensors too)"
        if triton_kernels.INTERPRETED
        else "compiled (CUDA tensors)"
    )
    return True, f"triton {mode}"


@overload
def check_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, backend: str = ..., blocking: Literal[True] = ...
) -> HealthReport: ...


@overload
def check_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, backend: str = ..., blocking: Literal[False]
) -> HealthHandle: ...


@overload
def check_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, backend: str = ..., blocking: bool
) -> HealthReport | HealthHandle: ...


def check_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, backend: str = "auto", blocking: bool = True
) -> HealthReport | HealthHandle:
    """Check ``(name, tensor)`` pairs such as ``model.named_parameters()`` for NaN/Inf.

    Returns a :class:`HealthReport` (per-tensor lists in input order), or with
    ``blocking=False`` a :class:`HealthHandle`: on CUDA with the Triton backend its result is
    being copied into pinned memory behind an event, so ``ready()`` never blocks and the host
    waits only in ``result()``; otherwise the handle is already ready. Nothing in a
    non-blocking call waits for the device, including the first reuse of a tensor set (when
    the CUDA graph is captured). The report is built only by ``result()``.

    ``backend``: ``"auto"`` uses Triton for CUDA tensors when it imports, else the reference;
    ``"triton"`` forces the kernel (CPU tensors only under TRITON_INTERPRET=1);
    ``"reference"`` forces pure PyTorch. Raises ValueError for an unknown backend, complex
    tensors or tensors on several devices; RuntimeError when ``"triton"`` cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    pairs = named_tensors if isinstance(named_tensors, (list, tuple)) else list(named_tensors)
    if not pairs:
        handle: HealthHandle = ReadyHealth(build_report([], [], [], [], [], backend="reference"))
        return handle.result() if blocking else handle
    # A handle keeps the names only: holding the tensors until result() would keep last step's
    # gradients alive and move this step's to new addresses (a new plan every step).
    names = [name for name, _ in pairs]
    tensors = [tensor for _, tensor in pairs]
    first = tensors[0]
    if backend == "triton" or (
        backend == "auto"
        and isinstance(first, torch.Tensor)
        and first.is_cuda
        and (_plan_module or _load_plan_module()) is not None
    ):
        handle = _check_triton(names, tensors)
    else:
        validate_tensors(names, tensors)
        handle = ReadyHealth(reference_check(names, tensors))
    return handle.result() if blocking else handle


def _check_triton(names: list[str], tensors: list[torch.Tensor]) -> HealthHandle:
    plan_module = _plan_module or _load_plan_module()
    if plan_module is None:
        raise RuntimeError(f"backend='triton' needs an importable Triton: {_triton_error}")
    try:
        plan = plan_module.find_plan(tensors)
    except (TypeError, AttributeError):  # not all tensors: let validation say which
        validate_tensors(names, tensors)
        raise
    if plan is None:
        device = validate_tensors(names, tensors)
        from tolaria.health import triton_kernels

        if device.type != "cuda" and not (device.type == "cpu" and triton_kernels.INTERPRETED):
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, or on CPU tensors only when TRITON_INTERPRET=1 "
                f"was set before tolaria.health's kernels were imported; got tensors on {device}. "
                "Use backend='auto' or 'reference' for CPU tensors."
            )
        plan = plan_module.build_plan(tensors)
    return plan.check(names, tensors)


__all__ = [
    "BACKENDS",
    "HealthHandle",
    "HealthReport",
    "check_tensors",
    "reference_check",
    "triton_status",
]
