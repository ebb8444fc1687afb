"""The verdict of one health check over a list of named tensors, and the handles that deliver it."""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tolaria import _ext


@dataclass(frozen=True)
class HealthReport:
    """Per-tensor findings, in the order the tensors were given.

    ``nonfinite[i] == nan[i] + posinf[i] + neginf[i]``; ``norms[i]`` is the L2 norm of tensor
    ``i`` computed in fp32 (fp64 for fp64 tensors) and is NaN/Inf when the tensor is sick.
    ``global_norm`` is ``sqrt(sum(norms**2))``. ``first_bad`` names the first tensor with a
    non-finite element, or is None when every tensor is finite. ``squares``: the per-tensor
    sums of squares behind the norms, when the backend computed them (the compiled pass and the
    kernel do; None for the reference): sums of them are exact where squared norms are not.
    A report made with ``dataclasses.replace(report, norms=...)`` should pass ``squares=None``
    too: the gradient norm reads ``squares`` first.
    """

    names: list[str]
    nonfinite: list[int]
    nan: list[int]
    posinf: list[int]
    neginf: list[int]
    norms: list[float]
    global_norm: float
    first_bad: str | None
    backend: str
    squares: list[float] | None = field(default=None, compare=False, repr=False)

    @property
    def healthy(self) -> bool:
        """True when no tensor holds a NaN or an Inf."""
        return self.first_bad is None

    @property
    def total_nonfinite(self) -> int:
        return sum(self.nonfinite)


def root_of_sum(squares: Sequence[float]) -> float:
    """``sqrt(fsum(squares))``; +Inf where fsum refuses a finite sum beyond the fp64 range."""
    try:
        return math.sqrt(math.fsum(squares))
    except OverflowError:  # fsum refuses finite partial sums beyond the fp64 range
        return math.inf


def build_report(
    names: Sequence[str],
    norms: Sequence[float],
    nan: Sequence[int],
    posinf: Sequence[int],
    neginf: Sequence[int],
    backend: str,
    *,
    squares: Sequence[float] | None = None,
) -> HealthReport:
    """Assemble a report; ``squares`` (per-tensor sums of squares) gives a more exact global norm."""
    if any(nan) or any(posinf) or any(neginf):
        nonfinite = [a + b + c for a, b, c in zip(nan, posinf, neginf, strict=True)]
        first_bad = next((name for name, bad in zip(names, nonfinite, strict=True) if bad), None)
    else:  # a healthy report, the common case: no Python work per tensor
        if not len(nan) == len(posinf) == len(neginf) == len(names):
            raise ValueError("names and counts differ in length")
        nonfinite, first_bad = [0] * len(names), None
    global_norm = root_of_sum(squares if squares is not None else list(map(operator.mul, norms, norms)))
    return HealthReport(
        names=list(names),
        nonfinite=nonfinite,
        nan=list(nan),
        posinf=list(posinf),
        neginf=list(neginf),
        norms=list(norms),
        global_norm=global_norm,
        first_bad=first_bad,
        backend=backend,
        squares=list(squares) if squares is not None else None,
    )


def report_from_sums(names: Sequence[str], sums: Sequence[Sequence[float]], backend: str) -> HealthReport:
    """Build a report from the kernel's ``[4][T]`` rows: sums of squares, NaN, +Inf, -Inf counts.

    A healthy result, the common case, builds its count lists without converting a float per
    tensor.
    """
    squares, nan, posinf, neginf = sums
    if not (any(nan) or any(posinf) or any(neginf)):
        return _healthy_report(names, list(squares), list(map(math.sqrt, squares)), backend)
    nan_counts = [int(c) for c in nan]
    posinf_counts = [int(c) for c in posinf]
    neginf_counts = [int(c) for c in neginf]
    nonfinite = [a + b + c for a, b, c in zip(nan_counts, posinf_counts, neginf_counts, strict=True)]
    return HealthReport(
        names=list(names),
        nonfinite=nonfinite,
        nan=nan_counts,
        posinf=posinf_counts,
        neginf=neginf_counts,
        norms=list(map(math.sqrt, squares)),
        global_norm=root_of_sum(squares),
        first_bad=next((name for name, bad in zip(names, nonfinite, strict=True) if bad), None),
        backend=backend,
        squares=list(squares),
    )


def _healthy_report(
    names: Sequence[str], squares: list[float], norms: list[float], backend: str
) -> HealthReport:
    """The report of a result with no non-finite element: every count zero, nothing bad."""
    count = len(names)
    return HealthReport(
        names=list(names),
        nonfinite=[0] * count,
        nan=[0] * count,
        posinf=[0] * count,
        neginf=[0] * count,
        norms=norms,
        global_norm=root_of_sum(squares),
        first_bad=None,
        backend=backend,
        squares=squares,
    )


_compiled_healthy_rows = _ext.compiled("healthy_rows")  # None: tensor ops
_float64 = torch.float64


def _healthy_rows(rows: torch.Tensor, count: int) -> tuple[list[float], list[float]] | None:
    """``(squares, norms)`` of a ``[4, count]`` result whose counts are all zero, else None."""
    if (
        _compiled_healthy_rows is not None
        and rows.dtype is _float64
        and rows.device.type == "cpu"  # host memory only (not CUDA, meta, MPS, ...)
        and rows.is_contiguous()
        and rows.shape == (4, count)
    ):
        return _compiled_healthy_rows(rows.data_ptr(), count)  # one pass over host memory
    if rows[1:].count_nonzero():
        return None
    squares = rows[0].tolist()
    # math.sqrt, not Tensor.sqrt: torch's vectorised fp64 sqrt is not correctly rounded on every
    # CPU (AVX-512 builds give sqrt(2.0) one ulp low), and a report's norms must not depend on it.
    return squares, list(map(math.sqrt, squares))


def report_from_rows(names: Sequence[str], rows: torch.Tensor, backend: str) -> HealthReport:
    """:func:`report_from_sums` of a ``[4, T]`` float64 host tensor. A healthy result, the
    common case, converts only the sums of squares and their square roots to Python floats, in
    one C pass with the extension (correctly rounded square roots, as ``math.sqrt``)."""
    healthy = _healthy_rows(rows, len(names))
    if healthy is None:
        return report_from_sums(names, rows.tolist(), backend)
    squares, norms = healthy
    return _healthy_report(names, squares, norms, backend)


class HealthHandle:
    """A health check in flight: ``ready()`` never blocks, ``result()`` waits for the report."""

    __slots__ = ()

    def ready(self) -> bool:
        raise NotImplementedError

    def result(self) -> HealthReport:
        raise NotImplementedError


class ReadyHealth(HealthHandle):
    """A check that finished before its call returned (the reference backend)."""

    __slots__ = ("_report",)

    def __init__(self, report: HealthReport) -> None:
        self._report = report

    def ready(self) -> bool:
        return True

    def result(self) -> HealthReport:
        return self._report


class ResultSlot:
    """A host buffer for one ``[4, T]`` fp64 result and the event that says it landed.

    On CUDA the buffer is pinned and ``event`` follows the copy into it; for a check that
    finished on the host (the interpreter), ``event`` is None. ``owner`` weakly names the handle
    still to read it: a slot whose handle was read or dropped may be reused (a copy still in
    flight into it is stream-ordered before the next one).
    """

    __slots__ = ("host", "event", "owner")

    def __init__(self, host: torch.Tensor, event: Any) -> None:
        self.host = host
        self.event = event
        self.owner: weakref.ref[PendingHealth] | None = None

    def is_free(self) -> bool:
        return self.owner is None or self.owner() is None


class PendingHealth(HealthHandle):
    """A kernel check whose ``[4, T]`` result is landing in a :class:`ResultSlot`.

    The report is built by the first ``result()``; ``ready()`` is one event query (no
    synchronization); ``result()`` waits for the event.
    """

    __slots__ = ("_names", "_slot", "_report", "_backend", "__weakref__")

    def __init__(self, names: Sequence[str], slot: ResultSlot, backend: str) -> None:
        self._names = names
        self._slot: ResultSlot | None = slot
        self._report: HealthReport | None = None
        self._backend = backend
        slot.owner = weakref.ref(self)

    def ready(self) -> bool:
        slot = self._slot
        return slot is None or slot.event is None or bool(slot.event.query())

    def result(self) -> HealthReport:
        slot = self._slot
        if slot is not None:
            if slot.event is not None:
                slot.event.synchronize()
            self._report = report_from_rows(self._names, slot.host, self._backend)
            slot.owner = None  # the plan may now reuse the buffer
            self._slot = None
        assert self._report is not None
        return self._report
