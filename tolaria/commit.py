"""Whether a capture becomes the Last Known Good: the one home of that decision.

A capture lives through these states, top to bottom (:class:`CaptureState`):

1. **STAGED** — :meth:`CommitLifecycle.stage` copied the model (and the known optimizer's
   state) into the store's staging buffer; on CUDA the copy may still be in flight.
2. **AWAITING_VERDICTS** — only after :meth:`TolariaGovernor.observe` was used (deferred
   checks): the verdicts of every step observed before the capture must be judged first. When
   the last of them is in, the gate is settled: any of them panicked → WITHHELD; a panic pending
   or an anomaly streak running at that moment → WITHHELD; otherwise back to STAGED.
3. :meth:`CommitLifecycle.resolve` verifies exactly the staged bytes (the store's health check),
   asks the process group, when there is one, whether every rank's capture is healthy (one
   collective), and ends the capture in one of:

   * **COMMITTED** — healthy and agreed: it is the new LKG;
   * **REJECTED** — its own bytes held NaN/Inf: discarded, the previous LKG stays;
   * **VETOED** — healthy here, but another rank's capture was sick: discarded everywhere;
   * **WITHHELD** — healthy, but a deferred verdict condemned the steps before it: discarded.

The lifecycle consumes deferred verdicts itself (:meth:`CommitLifecycle.consume`), stopping at
the gate's boundary so the gate is judged on the monitors exactly as they stood after its last
verdict. It returns what it found (a :class:`tolaria.watch.Panic`, a :class:`Resolved`) and
never calls back into the Governor, which announces panics and reports snapshots.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch
from torch import nn

from tolaria.deferred import VerdictQueue
from tolaria.distributed import LocalDecisions
from tolaria.snapshot.capture_plan import CapturePlans
from tolaria.snapshot.store import Resolution, SnapshotStore
from tolaria.watch import Panic, Watch


class CaptureState(enum.Enum):
    """Where one capture is in its life (see the module docstring)."""

    STAGED = "staged"
    AWAITING_VERDICTS = "awaiting_verdicts"
    COMMITTED = "committed"
    REJECTED = "rejected"
    VETOED = "vetoed"
    WITHHELD = "withheld"


@dataclass(frozen=True)
class SnapshotInfo:
    """What one :meth:`TolariaGovernor.snapshot` did. ``keys_captured`` are model state-dict keys
    (optimizer state travels too but is not listed); ``keys_excluded`` belong to non-fossilized
    seeds. ``bytes`` counts tied tensors once. ``seconds`` is how long the call blocked the host.
    ``committed`` is None while the capture is not resolved yet (an asynchronous CUDA copy in
    flight, or deferred verdicts still out): it is then resolved at the next snapshot, rollback
    or ``last_good_state`` read."""

    keys_captured: tuple[str, ...]
    keys_excluded: tuple[str, ...]
    bytes: int
    backend: str
    seconds: float
    committed: bool | None
    first_bad: str | None = None


@dataclass(frozen=True)
class Resolved:
    """How a capture ended: its final ``state``, what :meth:`TolariaGovernor.snapshot` reported
    when it was staged (``info``), the store's ``resolution``, why it was withheld (``""``
    unless WITHHELD) and the ranks of a process group whose capture was sick (empty when
    committed, and always without a group)."""

    state: CaptureState
    info: SnapshotInfo
    resolution: Resolution
    withheld: str = ""
    veto_ranks: tuple[int, ...] = ()


@dataclass
class _Staged:
    info: SnapshotInfo
    state: CaptureState
    in_flight: bool
    needs: int = 0  # verdicts (by sequence number) that must be judged before it may commit
    withheld: str = ""


def _refuse(healthy: bool) -> bool:
    return False


class CommitLifecycle:
    """The staged capture of one Governor and the transitions of its :class:`CaptureState`.

    ``store`` keeps the bytes, ``group`` agrees commits across ranks (a
    :class:`tolaria.distributed.LocalDecisions` without a process group), ``verdicts`` holds the
    deferred checks in flight, ``watch`` the monitors whose calm a gate requires.
    """

    def __init__(
        self, store: SnapshotStore, group: LocalDecisions, verdicts: VerdictQueue, watch: Watch
    ) -> None:
        self.store = store
        self.group = group
        self.verdicts = verdicts
        self.watch = watch
        self._staged: _Staged | None = None
        # What a capture holds, derived once and re-derived only when the model or optimizer
        # changed (tolaria.snapshot.capture_plan): no state-dict walk per snapshot.
        self.plans = CapturePlans()

    @property
    def state(self) -> CaptureState | None:
        """The staged capture's state; None when nothing is staged."""
        return None if self._staged is None else self._staged.state

    @property
    def settles_now(self) -> bool:
        """Whether ``snapshot()`` should resolve the capture before returning: always with a
        process group (every rank must vote at the same call), otherwise unless its copy is in
        flight or its verdicts are still out."""
        staged = self._staged
        if staged is None:
            return False
        if staged.state is CaptureState.AWAITING_VERDICTS:
            return False
        return self.group.distributed or not staged.in_flight

    # -- 1. stage ------------------------------------------------------------------------------
    def stage(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, order_stream: bool, started: float
    ) -> SnapshotInfo:
        """Capture ``model`` (minus non-fossilized seeds) and ``optimizer``'s state into the
        store's staging buffer. ``order_stream``: make the current CUDA stream wait for the copy
        (when no optimizer step pre-hook does). ``started``: the ``time.perf_counter()`` at which
        the caller's ``snapshot()`` began (the info's ``seconds`` count from there).

        Raises what the capture raises; the group is then told this rank's capture failed, so
        its peers do not wait for a vote that never comes, and nothing is staged."""
        try:
            contents = self.plans.contents(model, optimizer)
            ticket = self.store.capture(contents.entries, meta=contents.meta)
            if order_stream:
                self.store.make_stream_wait()
        except BaseException:
            self.group.agree_on_commit(False)  # this rank's vote: the peers resolve without it
            raise
        info = SnapshotInfo(
            keys_captured=contents.meta.model_keys, keys_excluded=contents.excluded, bytes=ticket.nbytes,
            backend=self.store.backend, seconds=time.perf_counter() - started, committed=None,
        )  # fmt: skip
        staged = _Staged(info, CaptureState.STAGED, ticket.in_flight)
        self._staged = staged
        if self.verdicts.pushed:
            staged.state, staged.needs = CaptureState.AWAITING_VERDICTS, self.verdicts.pushed
            if self.verdicts.judged >= staged.needs:
                self._settle_gate(staged, None)
        return info

    # -- 2. the gate ---------------------------------------------------------------------------
    def consume(self, *, wait_for: int | None = None) -> Panic | None:
        """Judge deferred verdicts in step order: every one with sequence number < ``wait_for``
        (waiting for it; None: all of them), then those already landed. Stops once at the staged
        capture's gate to settle it. Returns the panic found (the rest are then dropped)."""
        staged = self._staged
        if staged is None or staged.state is not CaptureState.AWAITING_VERDICTS:
            return self.verdicts.drain(wait_for=wait_for)
        panic = self.verdicts.drain(wait_for=wait_for, stop_at=staged.needs)
        if panic is None and self.verdicts.judged < staged.needs:
            return None  # its verdicts are still out
        self._settle_gate(staged, panic)
        return panic if panic is not None else self.verdicts.drain(wait_for=wait_for)

    def _settle_gate(self, staged: _Staged, panic: Panic | None) -> None:
        if panic is not None:
            staged.state = CaptureState.WITHHELD
            staged.withheld = f"the checks of step {panic.step}, before its capture, panicked"
        elif self.watch.pending is not None or self.watch.anomaly_streak:
            staged.state = CaptureState.WITHHELD
            staged.withheld = "a panic was pending or an anomaly streak was running"
        else:
            staged.state = CaptureState.STAGED

    # -- 3. resolve ----------------------------------------------------------------------------
    def resolve(self, *, drain: bool = False) -> tuple[Resolved | None, Panic | None]:
        """End the staged capture: judge the verdicts its gate needs (``drain``: every verdict
        still out), waiting for them; then verify, agree and commit or discard it. Returns how it
        ended (None when nothing was staged) and the panic those verdicts found, if any."""
        staged = self._staged
        panic = None
        if drain:
            panic = self.consume()
        elif staged is not None and staged.state is CaptureState.AWAITING_VERDICTS:
            panic = self.consume(wait_for=staged.needs)
        if staged is None:
            return None, panic
        self._staged = None
        withheld = staged.state is CaptureState.WITHHELD
        resolution = self.store.resolve_agreed(_refuse if withheld else self.group.agree_on_commit)
        if resolution is None:
            return None, panic
        if resolution.committed:
            state = CaptureState.COMMITTED
        elif not resolution.vetoed:
            state = CaptureState.REJECTED  # sick bytes: rejected whatever else was decided
        elif withheld:
            state = CaptureState.WITHHELD
        else:
            state = CaptureState.VETOED
        vetoes = () if state is CaptureState.COMMITTED else self.group.veto_ranks  # a sick rank vetoes too
        return Resolved(state, staged.info, resolution, staged.withheld, vetoes), panic


__all__ = ["CaptureState", "CommitLifecycle", "Resolved", "SnapshotInfo"]
