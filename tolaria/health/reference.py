"""Pure-PyTorch health check: the CPU path and the oracle the Triton kernel is tested against.

A healthy model pays for one batched norm per (device, dtype) group and nothing else: the
squares of a NaN or an Inf make a norm non-finite, so only tensors whose norm is non-finite
are counted element by element (NaN, +Inf, -Inf apart). A finite tensor whose squares
overflow fp32 is counted too and comes out with zero non-finite elements and an infinite norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import attrgetter

import torch

from tolaria.health.kinds import readable_all
from tolaria.health.report import HealthReport, build_report

_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_dtype, _device, _dim = attrgetter("dtype"), attrgetter("device"), torch.Tensor.dim


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 keeps its precision; every narrower float accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def integer_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of an integer or bool tensor as a 0-dim fp64 tensor on its device.

    Integer buffers (step counters, index tables) are finite by definition; fp64 keeps their
    squares exact up to 2**53.
    """
    return torch.linalg.vector_norm(tensor.detach().to(torch.float64))


def validate_tensors(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> torch.device:
    """The one device all ``tensors`` live on.

    Raises TypeError for a non-tensor and ValueError for tensors on more than one device
    (naming the first tensor on each).
    """
    kinds = set(map(type, tensors))
    if kinds and kinds <= _PLAIN_TYPES:  # the common case, in C-level passes (5,000 tensors a step)
        devices = set(map(_device, tensors))
        if len(devices) == 1:
            return devices.pop()
    device: torch.device | None = None
    first = ""
    for name, tensor in zip(names, tensors, strict=True):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"named_tensors must yield (str, torch.Tensor) pairs; {name!r} is {type(tensor).__name__}"
            )
        if device is None:
            device, first = tensor.device, name
        elif tensor.device != device:
            raise ValueError(
                f"named_tensors must all be on one device: {first!r} is on {device}, "
                f"{name!r} on {tensor.device}"
            )
    assert device is not None, "validate_tensors needs at least one tensor"
    return device


def _group_norms(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    accumulate = accumulation_dtype(dtype)
    try:
        # One multi-tensor launch on CUDA; a tight loop of vectorized reductions on CPU.
        return list(torch._foreach_norm(tensors, 2, dtype=accumulate))
    except (TypeError, RuntimeError):  # older torch without the dtype argument
        return [torch.linalg.vector_norm(t, dtype=accumulate) for t in tensors]


def count_nonfinite(tensor: torch.Tensor) -> tuple[int, int, int]:
    """How many NaN, +Inf and -Inf elements ``tensor`` holds (one read back to the host)."""
    with torch.no_grad():
        nan, posinf, neginf = torch.stack(
            [torch.isnan(tensor).sum(), torch.isposinf(tensor).sum(), torch.isneginf(tensor).sum()]
        ).tolist()
    return nan, posinf, neginf


def _single_group(tensors: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The one native float dtype of ``tensors`` when they all share it and one device (the usual
    model: one pass over them, no per-tensor grouping in Python), else None."""
    if not tensors:
        return None
    dtypes = set(map(_dtype, tensors))
    if len(dtypes) != 1 or len(set(map(_device, tensors))) != 1:
        return None
    dtype = dtypes.pop()
    return dtype if dtype in _NATIVE_DTYPES else None


def _scalar_tail(tensors: Sequence[torch.Tensor]) -> int:
    """Where the trailing run of 0-dim tensors starts (``len(tensors)`` when there is none)."""
    cut = len(tensors)
    if not cut or tensors[-1].dim():
        return cut
    dims = tuple(map(_dim, tensors))
    while cut and not dims[cut - 1]:
        cut -= 1
    return cut


def _check_one_group(
    names: Sequence[str], tensors: Sequence[torch.Tensor], dtype: torch.dtype
) -> HealthReport:
    """:func:`reference_check` of tensors that share one device and native float dtype."""
    cut = _scalar_tail(tensors)
    with torch.no_grad():
        pieces = [torch.stack(_group_norms(list(tensors[:cut]), dtype))] if cut else []
        if cut < len(tensors):
            # A tail of 0-dim tensors (the gradient norms tolaria.clip_grad_norm_ hands over): the
            # L2 norm of one value is its magnitude, for all of them in one op, no dispatch each.
            pieces.append(torch.stack(list(tensors[cut:])).abs().to(accumulation_dtype(dtype)))
        norms = torch.cat(pieces).to(torch.float64).tolist()
    count = len(norms)
    nan, posinf, neginf = [0] * count, [0] * count, [0] * count
    if not all(map(math.isfinite, norms)):  # rare: a tensor is sick or overflows its squares
        with torch.no_grad():
            for index, value in enumerate(norms):
                if not math.isfinite(value):
                    nan[index], posinf[index], neginf[index] = count_nonfinite(tensors[index])
    return build_report(names, norms, nan, posinf, neginf, "reference")


def reference_check(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> HealthReport:
    """Check ``tensors`` with plain torch ops; returns a :class:`HealthReport` in input order.

    Reads the results back to the host (one read per device for the norms, and one per tensor
    whose norm is not finite). Integer and bool tensors count zero non-finite elements and get an fp64
    norm. DTensors, sparse, complex and quantized tensors are read as
    :func:`tolaria.health.kinds.readable` says; raises ValueError for a tensor without data
    (meta, lazy) or of another layout.
    """
    if len(names) != len(tensors):
        raise ValueError(f"names and tensors differ in length: {len(names)} != {len(tensors)}")
    tensors = readable_all(names, tensors)
    count = len(tensors)
    single = _single_group(tensors)
    if single is not None:
        return _check_one_group(names, tensors, single)
    # Group members as (input index, tensor as read); fp8 and friends are read widened to fp32.
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
    integers: list[tuple[int, torch.Tensor]] = []
    for index, tensor in enumerate(tensors):
        dtype = tensor.dtype
        if dtype not in _NATIVE_DTYPES:
            if not tensor.is_floating_point():
                integers.append((index, tensor))
                continue
            tensor, dtype = tensor.detach().to(torch.float32), torch.float32
        groups.setdefault((tensor.device, dtype), []).append((index, tensor))

    norms = [0.0] * count
    nan = [0] * count
    posinf = [0] * count
    neginf = [0] * count
    with torch.no_grad():  # no autograd bookkeeping, so parameters need no detach()
        per_device: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
        for (device, dtype), members in groups.items():
            order, pieces = per_device.setdefault(device, ([], []))
            order.extend(index for index, _ in members)
            pieces.append(torch.stack(_group_norms([t for _, t in members], dtype)).to(torch.float64))
        for index, tensor in integers:
            order, pieces = per_device.setdefault(tensor.device, ([], []))
            order.append(index)
            pieces.append(integer_norm(tensor).reshape(1))
        for order, pieces in per_device.values():
            for index, value in zip(order, torch.cat(pieces).tolist(), strict=True):
                norms[index] = value

        if not all(map(math.isfinite, norms)):  # rare: a tensor is sick or overflows its squares
            for members in groups.values():
                for index, tensor in members:
                    if not math.isfinite(norms[index]):
                        nan[index], posinf[index], neginf[index] = count_nonfinite(tensor)
    return build_report(names, norms, nan, posinf, neginf, "reference")
