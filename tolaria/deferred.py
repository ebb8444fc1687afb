"""Deferred verdicts: judge a step's loss, weights and gradients without a host sync.

The blocking checks (``check_vital_signs(loss)``, ``check_health()``) read their results on the
host before they return, and every such read drains the GPU queue: the GPU idles while Python
launches the next step. :meth:`TolariaGovernor.observe` instead *enqueues* both checks of one
step, as PyTorch's GradScaler keeps its inf-flags on the device:

* the loss is copied into a pinned host slot behind a CUDA event (:class:`LossStager`);
* the fused health check of parameters and gradients runs with ``blocking=False``: its result
  lands in pinned memory behind its own event (:func:`start_health`; the Triton backend: the
  reference backend computes its report at once, a sync on CUDA).

Together they are one :class:`Verdict`, queued in step order in a :class:`VerdictQueue`. A
verdict is *consumed* once its events have completed (``ready()`` is polled, never waited on,
on the healthy path): the Governor then feeds it through exactly the code of the blocking path
(the loss monitor first; the tensors only when the loss did not panic). A panic makes every
later verdict moot: they were computed on a state the rollback abandons, so they are dropped
without touching any monitor history, and the monitors end exactly as the blocking path leaves
them.

**Bounded lag.** At most ``max_pending`` observed steps may have verdicts outstanding; beyond
that :meth:`VerdictQueue.drain` waits for the oldest. The wait is short: that work was enqueued
``max_pending`` steps ago and the newer steps keep the GPU busy meanwhile. Between a sick step
and its verdict the loop goes on (at most ``max_pending`` more optimizer steps); the rollback
restores weights and optimizer state from the LKG, so they leave no trace in the model. What
lives outside it (data-loader position, LR-scheduler steps) is the caller's to rewind, if needed.

**Safety rule (never commit what a late verdict condemns).** A capture taken in deferred mode
gets a :class:`CaptureGate`: the verdicts of every step observed before it (the steps up to and
including the captured weights' own step: the weights a step's checks judged are the ones
captured before its optimizer step) must all be in. The capture is committed only if none of
them panicked and, once the last of them was judged, no panic was pending and no anomaly streak
was running (what the blocking GuardedStep requires before it snapshots at all). A panic found
late therefore discards every capture taken after the sick step, and the rollback restores the
previous committed LKG. Resolving a gated capture (``snapshot()`` resolving the previous one,
``last_good_state``, ``execute_rollback()``, ``reset()``) first drains the verdicts it needs,
waiting for their events there: these calls are rare and the work is already enqueued.

**Process groups.** Not supported yet: consensus needs every rank to judge the same step at the
same call, and readiness differs between ranks. ``observe()`` raises NotImplementedError with a
process group; the blocking checks remain fully supported there.

On CPU every handle is ready at once, so deferred mode takes the same decisions as the blocking
mode at the same steps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tolaria import health
from tolaria.health import HealthHandle
from tolaria.snapshot.store import Resolution, SnapshotStore
from tolaria.vitals import check_loss_tensor, coerce_loss
from tolaria.watch import Panic, Watch

#: The Governor's decision step: ``decide(observe, check_name, step)`` runs ``observe`` (which
#: feeds a monitor of the Watch), announces a panic and returns whether there was one.
Decide = Callable[[Callable[[], "Panic | None"], str, "int | None"], bool]

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


def start_health(pairs: Sequence[tuple[str, torch.Tensor]], backend: str) -> HealthHandle:
    """Enqueue the health check of ``pairs`` without waiting for it (looked up at call time, so
    tests can substitute a late handle)."""
    return health.check_tensors(pairs, backend=backend, blocking=False)


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


@dataclass
class CaptureGate:
    """The commit condition of a capture taken in deferred mode: the verdicts with ``seq <
    needs`` must be in; ``ok`` is None until they are, then whether the capture may commit
    (none panicked, and the monitors were calm after the last one)."""

    needs: int
    ok: bool | None = None
    withheld: str = ""


class VerdictQueue:
    """Verdicts not yet consumed, oldest first, and the :class:`CaptureGate` of the staged
    capture (see the module docstring for the rules). ``watch`` holds the monitors; ``decide``
    is the Governor's (the blocking checks use it too: one path for both)."""

    def __init__(self, watch: Watch, decide: Decide, max_pending: int = DEFAULT_MAX_PENDING_STEPS) -> None:
        self.watch = watch
        self.decide = decide
        self.max_pending = check_max_pending(max_pending)
        self.stager = LossStager()
        self.pushed = 0
        self.gate: CaptureGate | None = None
        self._queue: deque[Verdict] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, step: int | None, loss: object, pairs: Sequence[tuple[str, torch.Tensor]], n_params: int,
             backend: str, *, distributed: bool = False) -> None:  # fmt: skip
        """Enqueue one step's checks: stage ``loss`` and start the health check of ``pairs``
        (parameters first, ``n_params`` of them); ``step`` labels it (None: its sequence number).
        Then consume what is due (bounded lag). Raises before anything is enqueued: TypeError for
        a bad ``loss`` or ``step``, NotImplementedError when ``distributed`` (a process group)."""
        if distributed:
            raise NotImplementedError(
                "TolariaGovernor.observe() (deferred checks) is not supported with a process group "
                "yet; use check_vital_signs() and check_health(), which agree every decision"
            )
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int or None, got {type(step).__name__}")
        staged = self.stager.stage(loss)
        handle = start_health(pairs, backend) if pairs else None
        label = self.pushed if step is None else step
        self._queue.append(Verdict(self.pushed, label, staged, handle, n_params))
        self.pushed += 1
        self.drain(wait_for=self.pushed - self.max_pending)

    def drain(self, *, wait_for: int | None = None) -> None:
        """Consume verdicts in step order: every one with ``seq < wait_for`` (waiting for it;
        None: all of them), then the ones already ready. After a panic the rest are dropped."""
        limit = self.pushed if wait_for is None else wait_for
        while self._queue:
            verdict = self._queue[0]
            if verdict.seq >= limit and not verdict.ready():
                return
            self._queue.popleft()
            panicked = self._judge(verdict)
            gate = self.gate
            if gate is not None and gate.ok is None and (panicked or verdict.seq == gate.needs - 1):
                self._settle(gate, panicked, verdict.step)
            if panicked:
                self._queue.clear()  # computed on a state the rollback abandons: never fed to a monitor
                return

    def catch_up(self) -> bool:
        """Before a blocking check: judge every verdict still out (waiting for it); True when
        that found a panic (the new check then belongs to an abandoned state)."""
        if not self._queue:
            return False
        before = self.watch.pending
        self.drain()
        return self.watch.pending is not None and self.watch.pending is not before

    def _judge(self, verdict: Verdict) -> bool:
        """One verdict through the blocking path's code: the loss, then (unless it panicked) the
        weights and gradients, exactly as GuardedStep orders the blocking checks."""
        loss = verdict.loss.value()
        if self.decide(lambda: self.watch.observe_loss(loss), "check_vital_signs", verdict.step):
            return True
        handle = verdict.health
        if handle is None:
            return False
        report = handle.result()
        return self.decide(lambda: self.watch.observe_tensors(report, verdict.n_params), "check_health",
                           verdict.step)  # fmt: skip

    def settle(
        self, store: SnapshotStore, resolve: Callable[[SnapshotStore], Resolution | None], *, drain: bool
    ) -> tuple[Resolution | None, str]:
        """Resolve ``store``'s staged capture behind its gate: first consume the verdicts the
        gate needs (every pending one with ``drain``), waiting for them; then commit through
        ``resolve`` or, when the gate refuses, verify and discard it. Returns the resolution and
        why the capture was withheld ("" when it was not)."""
        gate = self.gate
        if drain or (gate is not None and gate.ok is None):
            self.drain(wait_for=None if drain or gate is None else gate.needs)  # settles the gate
        self.gate = None
        if gate is not None and not gate.ok and store.in_flight:
            return store.resolve_agreed(lambda healthy: False), gate.withheld
        return resolve(store), ""

    def open_gate(self) -> CaptureGate | None:
        """Gate the capture just taken on every verdict pushed so far (None when ``observe()``
        was never used: the blocking contract applies unchanged)."""
        if self.pushed == 0:
            self.gate = None
            return None
        self.gate = CaptureGate(self.pushed)
        if not self._queue:
            self._settle(self.gate, False, None)
        return self.gate

    def _settle(self, gate: CaptureGate, panicked: bool, step: int | None) -> None:
        if panicked:
            gate.ok, gate.withheld = False, f"the checks of step {step}, before its capture, panicked"
        elif self.watch.pending is not None or self.watch.anomaly_streak:
            gate.ok, gate.withheld = False, "a panic was pending or an anomaly streak was running"
        else:
            gate.ok = True


__all__ = [
    "DEFAULT_MAX_PENDING_STEPS",
    "CaptureGate",
    "LossSlot",
    "LossStager",
    "StagedLoss",
    "Verdict",
    "VerdictQueue",
    "check_max_pending",
    "start_health",
]
