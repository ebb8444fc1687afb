"""One call checks many tensors: dispatch to the fused Triton kernel, the compiled CPU pass or
the pure-PyTorch reference.

``backend="auto"`` takes Triton for CUDA tensors when :func:`triton_health` says it imports
(the answer :mod:`tolaria.backends` and ``tolaria doctor`` give too), the compiled pass of
:mod:`tolaria.health.native` for CPU tensors when the extension loaded, the reference otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Literal, overload

import torch

from tolaria.health import native
from tolaria.health.kinds import readable_all
from tolaria.health.reference import reference_check, validate_tensors
from tolaria.health.report import HealthHandle, HealthReport, ReadyHealth, build_report

BACKENDS = ("auto", "triton", "native", "reference")

_triton_plan: ModuleType | None = None
_triton_error: str | None = None


def triton_health() -> ModuleType | None:
    """The Triton health path (:mod:`tolaria.health.plan`), imported on first use, or None when
    it cannot be imported here; :func:`triton_health_error` then says why. This is the one
    answer to "can the fused check run?": the dispatcher, the snapshot engine and
    ``doctor`` (through :mod:`tolaria.backends`) all ask it."""
    global _triton_plan, _triton_error
    if _triton_plan is None and _triton_error is None:
        try:
            from tolaria.health import plan

            _triton_plan = plan
        except Exception as error:  # ImportError, or a Triton that fails while initializing
            _triton_error = f"{type(error).__name__}: {error}"
    return _triton_plan


def triton_health_error() -> str | None:
    """Why :func:`triton_health` returned None (None when it imported, or was never asked)."""
    return _triton_error


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

    ``backend``: ``"auto"`` uses Triton for CUDA tensors when it imports, the compiled pass
    for CPU tensors when the extension loaded, else the reference; ``"triton"`` forces the
    kernel (CPU tensors only under TRITON_INTERPRET=1); ``"native"`` forces the compiled CPU
    pass; ``"reference"`` forces pure PyTorch.

    Every kind of tensor a model holds is accepted (:mod:`tolaria.health.kinds`): a DTensor's
    local shard is checked, a sparse tensor's coalesced values, a complex tensor's real view.

    Raises ValueError for an unknown backend, tensors on several devices or a tensor without
    data (meta, lazy), and for ``"native"`` with tensors off the CPU; TypeError when
    ``named_tensors`` is a mapping or does not hold ``(str, tensor)`` pairs; RuntimeError when
    ``"triton"`` or ``"native"`` cannot run.
    """
    _check_backend(backend)
    if isinstance(named_tensors, Mapping):
        # Iterating a dict yields its keys: a silent misreading, never what was meant.
        raise TypeError(
            "named_tensors must be (name, tensor) pairs such as model.named_parameters(), got a "
            f"{type(named_tensors).__name__}; pass its .items()"
        )
    pairs = named_tensors if isinstance(named_tensors, (list, tuple)) else list(named_tensors)
    try:
        names = [name for name, _ in pairs]
        tensors = [tensor for _, tensor in pairs]
    except (TypeError, ValueError):
        raise TypeError(f"named_tensors must hold (name, tensor) pairs, got {_describe(pairs)}") from None
    handle = check_listed(names, tensors, backend=backend)
    return handle.result() if blocking else handle


def check_listed(names: Sequence[str], tensors: Sequence[torch.Tensor], *, backend: str) -> HealthHandle:
    """The handle of :func:`check_tensors` for ``tensors[i]`` named ``names[i]`` (two parallel
    sequences, as the Governor keeps them: no pair is built or taken apart); ``result()`` is the
    blocking call's report. ``backend`` and the tensors are validated as there (ValueError for
    a backend that is not one of :data:`BACKENDS`)."""
    _check_backend(backend)
    if not tensors:
        return ReadyHealth(build_report([], [], [], [], [], backend="reference"))
    # A handle keeps the names only: holding the tensors until result() would keep last step's
    # gradients alive and move this step's to new addresses (a new plan every step).
    first = tensors[0]
    if backend == "triton" or (
        backend == "auto"
        and isinstance(first, torch.Tensor)
        and first.is_cuda
        and triton_health() is not None
    ):
        handle = _check_triton(names, tensors)
    elif backend == "native" or (
        backend == "auto"
        and isinstance(first, torch.Tensor)
        and first.device.type == "cpu"
        and native.available()
    ):
        handle = ReadyHealth(native.native_check(names, tensors))  # validates the tensors itself
    else:
        validate_tensors(names, tensors)
        handle = ReadyHealth(reference_check(names, tensors))
    return handle


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _describe(pairs: object) -> str:
    items = list(pairs) if isinstance(pairs, (list, tuple)) else []
    bad = next((item for item in items if not (isinstance(item, tuple) and len(item) == 2)), None)
    return f"an item of type {type(bad).__name__}" if bad is not None else type(pairs).__name__


def triton_reads_cpu() -> bool:
    """Whether ``backend="triton"`` can read CPU tensors here: Triton imports (see
    :func:`triton_health`) and its kernels run in Triton's interpreter (TRITON_INTERPRET=1 before
    they were imported), or a CPU runtime is installed (the bench's fake device). False on a GPU
    machine without the interpreter."""
    plan_module = triton_health()
    if plan_module is None:
        return False
    from tolaria.health import triton_kernels

    return bool(triton_kernels.INTERPRETED) or plan_module.cpu_runtime() is not None


def host_backend(backend: str) -> str:
    """The backend that checks host copies of a model's tensors (a snapshot's staging bytes,
    the optimizer's CPU step counts) when the model's own checks use ``backend``: ``backend``
    itself, except ``"triton"`` where Triton imports but cannot read CPU memory (a GPU machine
    without TRITON_INTERPRET), which gets ``"auto"`` (the compiled CPU pass). So
    ``health_backend="triton"`` forces the kernel on a CUDA model's tensors without making every
    capture's verification raise. Where Triton does not import, ``"triton"`` stays, so the check
    raises why."""
    if backend != "triton" or triton_health() is None or triton_reads_cpu():
        return backend
    return "auto"


def _check_triton(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> HealthHandle:
    plan_module = triton_health()
    if plan_module is None:
        raise RuntimeError(f"backend='triton' needs an importable Triton: {triton_health_error()}")
    try:
        plan = plan_module.find_plan(tensors)
    except (TypeError, AttributeError, RuntimeError):  # no data pointer (sparse), or not a tensor
        plan = None
    if plan is not None:
        return plan.check(names, tensors)
    # The cached plans hold what the kernel reads: DTensor shards, sparse values, real views.
    device = validate_tensors(names, tensors)
    tensors = readable_all(names, tensors)
    plan = plan_module.find_plan(tensors)
    if plan is None:
        on_cpu = device.type == "cpu" and triton_reads_cpu()
        if device.type != "cuda" and not on_cpu:
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, or on CPU tensors only when TRITON_INTERPRET=1 "
                f"was set before tolaria.health's kernels were imported; got tensors on {device}. "
                "Use backend='auto' or 'reference' for CPU tensors."
            )
        plan = plan_module.build_plan(tensors)
    return plan.check(names, tensors)


__all__ = [
    "BACKENDS",
    "check_listed",
    "check_tensors",
    "host_backend",
    "triton_health",
    "triton_health_error",
    "triton_reads_cpu",
]
