"""Deferred verdicts: a step's loss and health checks in flight, judged once they land.

:meth:`TolariaGovernor.observe` *enqueues* one step's checks instead of reading them on the
host, as PyTorch's GradScaler keeps its inf-flags on the device: the loss is copied into a pinned
host slot behind a CUDA event (:class:`LossStager`), and the fused health check of parameters
and gradients runs with ``blocking=False`` (:func:`start_health`). Together they are one
:class:`Verdict`, queued in step order in a :class:`VerdictQueue`.

A verdict is judged once its events have completed (``ready()`` is polled, never waited on, on
the healthy path), through the same monitors as the blocking checks (the loss first; the tensors
only when the loss did not panic). A panic makes every later verdict moot: they were computed on
a state the rollback abandons, so they are dropped without touching any monitor history.
At most ``max_pending`` observed steps may have verdicts outstanding; the Governor waits for the
oldest beyond that. Whether a capture taken meanwhile may commit is decided in
:mod:`tolaria.commit`. On CPU every handle is ready at once, so deferred mode takes the same
decisions as the blocking mode at the same steps.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from tolaria.health import HealthHandle, dispatch
from tolaria.health.pairs import Listing
from tolaria.vitals import check_loss_tensor, coerce_loss
from tolaria.watch import Panic, Watch

#: How many observed steps may have verdicts outstanding before ``observe()`` waits.
DEFAULT_MAX_PENDING_STEPS = 2


def check_max_pending(value: object) -> int:
    """``max_pending_steps`` validated: an int >= 0 (0 waits for every verdict at once: the
    deferred path with blocking timing). ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_pending_steps must be an int >= 0, got {value!r}")
    return value


class LossSlot:
    """A pinned float64 for one loss and the event that says it has landed."""

    __slots__ = ("host", "event")

    def __init__(self, host: torch.Tensor, event: Any) -> None:
        self.host = host
        self.event = event


class StagedLoss:
    """One loss on its way to the host: ``ready()`` never blocks, ``value()`` may wait."""

    __slots__ = ("_value", "_slot", "_pool")

    def __init__(self, value: float, slot: LossSlot | None = None, pool: list[LossSlot] | None = None
                 ) -> None:  # fmt: skip
        self._value = value
        self._slot = slot
        self._pool = pool

    def ready(self) -> bool:
        return self._slot is None or bool(self._slot.event.query())

    def value(self) -> float:
        """The loss as a Python float (waits for its copy when it is still in flight)."""
        slot = self._slot
        if slot is not None:
            slot.event.synchronize()
            self._value = float(slot.host[0])
            self._slot = None
            if self._pool is not None:
                self._pool.append(slot)  # read: reusable (a dropped one is simply collected)
        return self._value


class LossStager:
    """Stages losses without a host read: CUDA tensors go to pinned slots behind an event (slots
    are reused once read, per device); CPU tensors and Python numbers are read at once, which
    costs no sync. Another device's tensor is read at once too (one sync). The three device
    hooks are the only CUDA calls (tests drive the path on CPU with fakes)."""

    def __init__(self) -> None:
        self._pools: dict[torch.device, list[LossSlot]] = {}

    def stage(self, loss: object) -> StagedLoss:
        """Raises TypeError (naming the type or shape) for anything but a real number or a
        one-element real tensor, before anything is enqueued."""
        if not isinstance(loss, torch.Tensor) or not self.on_device(loss):
            return StagedLoss(coerce_loss(loss))
        scalar = check_loss_tensor(loss)
        pool = self._pools.setdefault(loss.device, [])
        slot = pool.pop() if pool else self.new_slot()
        # Widen on the device (exact for every float dtype), then one asynchronous copy; the
        # temporary is freed in stream order, after the copy has read it.
        slot.host.copy_(scalar.reshape(1).to(torch.float64), non_blocking=True)
        self.record(slot, loss.device)
        return StagedLoss(math.nan, slot, pool)

    def on_device(self, loss: torch.Tensor) -> bool:
        return loss.is_cuda

    def new_slot(self) -> LossSlot:
        return LossSlot(torch.empty(1, dtype=torch.float64, pin_memory=True), torch.cuda.Event())

    def record(self, slot: LossSlot, device: torch.device) -> None:
        slot.event.record(torch.cuda.current_stream(device))


def start_health(listing: Listing, backend: str) -> HealthHandle:
    """Enqueue the health check of ``listing`` without waiting for it (looked up at call time,
    so tests can substitute a late handle)."""
    return dispatch.check_listed(listing.names, listing.tensors, backend=backend)


@dataclass
class Verdict:
    """One observed step's checks in flight. ``seq`` orders verdicts (0, 1, ...); ``step`` is
    the caller's label for the step; ``n_params`` is how many of the health entries are
    parameters (the rest are gradients)."""

    seq: int
    step: int
    loss: StagedLoss
    health: HealthHandle | None
    n_params: int

    def ready(self) -> bool:
        return self.loss.ready() and (self.health is None or self.health.ready())


class VerdictQueue:
    """Verdicts not yet judged, oldest first. ``watch`` holds the monitors that judge them.

    ``pushed`` counts the verdicts ever enqueued (their sequence numbers are 0, 1, ...);
    ``judged`` is the sequence number of the next one to judge (every verdict below it was
    judged or dropped)."""

    def __init__(self, watch: Watch, max_pending: int = DEFAULT_MAX_PENDING_STEPS) -> None:
        self.watch = watch
        self.max_pending = check_max_pending(max_pending)
        self.stager = LossStager()
        self.pushed = 0
        self.judged = 0
        self._queue: deque[Verdict] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(
        self, step: int | None, loss: object, listing: Listing, backend: str, *, distributed: bool = False
    ) -> None:
        """Enqueue one step's checks: stage ``loss`` and start the health check of ``listing``
        (parameters first); ``step`` labels it (None: its sequence number).
        Raises before anything is enqueued: TypeError for a bad ``loss`` or ``step``,
        NotImplementedError when ``distributed`` (a process group: consensus needs every rank to
        judge the same step at the same call, and readiness differs between ranks)."""
        if distributed:
            raise NotImplementedError(
                "TolariaGovernor.observe() (deferred checks) is not supported with a process group "
                "yet; use check_vital_signs() and check_health(), which agree every decision"
            )
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int or None, got {type(step).__name__}")
        staged = self.stager.stage(loss)
        handle = start_health(listing, backend) if listing.tensors else None
        label = self.pushed if step is None else step
        self._queue.append(Verdict(self.pushed, label, staged, handle, listing.n_params))
        self.pushed += 1

    def drain(self, *, wait_for: int | None = None, stop_at: int | None = None) -> Panic | None:
        """Judge verdicts in step order: every one with ``seq < wait_for`` (waiting for it;
        None: all of them), then the ones already ready, never one with ``seq >= stop_at``.
        Returns the first panic (the later verdicts are then dropped), else None."""
        limit = self.pushed if wait_for is None else wait_for
        while self._queue:
            verdict = self._queue[0]
            if stop_at is not None and verdict.seq >= stop_at:
                return None
            if verdict.seq >= limit and not verdict.ready():
                return None
            self._queue.popleft()
            self.judged = verdict.seq + 1
            panic = self._judge(verdict)
            if panic is not None:
                self._queue.clear()  # computed on a state the rollback abandons: never fed to a monitor
                self.judged = self.pushed
                return panic
        return None

    def _judge(self, verdict: Verdict) -> Panic | None:
        """One verdict through the blocking path's monitors: the loss, then (unless it panicked)
        the weights and gradients, exactly as GuardedStep orders the blocking checks."""
        panic = self.watch.observe_loss(verdict.loss.value(), verdict.step)
        if panic is not None or verdict.health is None:
            return panic
        return self.watch.observe_tensors(verdict.health.result(), verdict.n_params, verdict.step)


__all__ = [
    "DEFAULT_MAX_PENDING_STEPS",
    "LossSlot",
    "LossStager",
    "StagedLoss",
    "Verdict",
    "VerdictQueue",
    "check_max_pending",
    "start_health",
]
