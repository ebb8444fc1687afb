"""TolariaGovernor: the fail-safe watchdog a training loop calls every step.

It decides *when*: to judge a loss or the tensors (:mod:`tolaria.watch` judges, with the
detectors of :mod:`tolaria.vitals` and the settings of :mod:`tolaria.config`), to capture (
:mod:`tolaria.commit` decides whether a capture becomes the Last Known Good, the stores of
:mod:`tolaria.snapshot` keep the bytes), to roll back, and what to report. Telemetry goes
through the module-level name ``get_hub``, looked up at call time, so users can patch
``tolaria.governor.get_hub``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tolaria import health
from tolaria.commit import CommitLifecycle, Resolved, SnapshotInfo
from tolaria.config import WatchConfig, check_number
from tolaria.constants import (
    DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
    DEFAULT_GOVERNOR_DEATH_PENALTY,
    DEFAULT_GOVERNOR_HISTORY_WINDOW,
    DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
    DEFAULT_GOVERNOR_SENSITIVITY,
    DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
)
from tolaria.deferred import VerdictQueue
from tolaria.distributed import make_decisions
from tolaria.governor_attributes import GovernorAttributes
from tolaria.governor_extras import GovernorExtras
from tolaria.health import dispatch
from tolaria.health.pairs import CheckedTensors, GradientNorms, Listing
from tolaria.optim import unwrap_optimizer
from tolaria.recovery.ladder import RecoveryLadder
from tolaria.recovery.policy import RecoveryPolicy
from tolaria.restore_state import RestoreState
from tolaria.rollback import (
    REASON_MANUAL_ROLLBACK,
    Attribution,
    GovernorReport,
    check_env_id,
    observed_report,
    perform_rollback,
)
from tolaria.snapshot.entries import (
    check_model_snapshottable,
    check_optimizer_params,
    device_of,
    order_steps_after_captures,
)
from tolaria.snapshot.factory import make_store
from tolaria.snapshot.handout import LkgHandout
from tolaria.snapshot.store import require_default_stream
from tolaria.telemetry import TelemetryHub, get_hub
from tolaria.telemetry.events import panic_event, snapshot_events
from tolaria.watch import Panic, Watch, gradient_norm

logger = logging.getLogger(__name__)


def _current_hub() -> TelemetryHub:
    """This module's ``get_hub``, looked up at call time (patchable); the store's events use it."""
    return get_hub()


class TolariaGovernor(GovernorAttributes, GovernorExtras):
    """Watches one model, keeps its Last Known Good state, and rolls it back on failure.

    The positional signature is the original Governor's (a drop-in replacement). New options
    are keyword-only: ``optimizer`` (its state is captured and restored with the model, and a
    step pre-hook keeps its updates ordered after in-flight captures), ``check_parameters`` /
    ``check_gradients`` (what ``check_health()`` inspects), ``snapshot_backend`` ("auto",
    "native", "reference"), ``health_backend`` ("auto", "triton", "native" for CPU models, "reference"), and
    ``process_group`` (None: never a collective; "auto": the default group when
    torch.distributed is initialized; or a ProcessGroup, whose timeout bounds every agreement).
    With a group, every decision is agreed by all ranks (see :mod:`tolaria.distributed`).
    Settable attributes beyond the original's: ``grad_norm_multiplier`` (the "m·mean" of the
    gradient-norm explosion test, default 10) and ``max_pending_steps`` (how many observed
    steps' verdicts :meth:`observe` lets lag behind, default 2).

    Raises TypeError/ValueError naming the argument for bad input (e.g. ``history_window < 10``)
    and RuntimeError when ``snapshot_backend="native"`` is unavailable. The constructor takes
    the first snapshot.
    """

    def __init__(
        self,
        model: nn.Module,
        sensitivity: float = DEFAULT_GOVERNOR_SENSITIVITY,
        multiplier: float = DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
        absolute_threshold: float = DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
        death_penalty: float = DEFAULT_GOVERNOR_DEATH_PENALTY,
        history_window: int = DEFAULT_GOVERNOR_HISTORY_WINDOW,
        min_panics_before_rollback: int = DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
        random_guess_loss: float | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        check_parameters: bool = True,
        check_gradients: bool = True,
        snapshot_backend: str = "auto",
        health_backend: str = "auto",
        process_group: Any = None,
        recovery: RecoveryPolicy | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if health_backend not in health.BACKENDS:
            raise ValueError(f"health_backend must be one of {health.BACKENDS}, got {health_backend!r}")
        for name, flag in (("check_parameters", check_parameters), ("check_gradients", check_gradients)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {type(flag).__name__}")
        device = device_of(model)
        if health_backend == "native" and device.type != "cpu":
            raise ValueError(f"health_backend='native' checks CPU tensors; model on {device}: use 'auto'")
        self.model = model
        self.death_penalty = check_number("death_penalty", death_penalty, minimum=0.0)
        self._watch = Watch(
            WatchConfig(
                sensitivity=sensitivity,
                multiplier=multiplier,
                absolute_threshold=absolute_threshold,
                history_window=history_window,
                min_panics_before_rollback=min_panics_before_rollback,
                random_guess_loss=random_guess_loss,
            )
        )
        self._verdicts = VerdictQueue(self._watch)
        self.check_parameters = check_parameters
        self.check_gradients = check_gradients
        self.health_backend = health_backend
        self._group = make_decisions(process_group)
        self._store = make_store(snapshot_backend, device=device, health_backend=health_backend)
        self._store.hub_source = _current_hub
        self._commit = CommitLifecycle(self._store, self._group, self._verdicts, self._watch)
        self._last_grad_norm: float | None = None
        self._checked = CheckedTensors()
        self._known_gradients: GradientNorms | None = None  # handed by tolaria.clip_grad_norm_
        self._handout: LkgHandout | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._hook_handle: Any = None
        if recovery is not None and not isinstance(recovery, RecoveryPolicy):
            raise TypeError(
                f"recovery must be a tolaria.RecoveryPolicy or None, got {type(recovery).__name__}"
            )
        self.recovery = recovery
        self._ladder: RecoveryLadder | None = None
        self._clock = 0  # the Governor's step count: one per check_vital_signs() or observe()
        self._restore = RestoreState()
        self._set_optimizer(optimizer)
        check_model_snapshottable(model, self.optimizer)  # meta, lazy, quantized: say so, before a copy
        self.snapshot()

    # -- snapshot ------------------------------------------------------------------------------
    def snapshot(self) -> SnapshotInfo:
        """Capture the model (minus non-fossilized seeds) and the known optimizer's state.

        On CPU the capture is verified and committed (or rejected: the previous LKG stays, a
        HEALTH_ALERT is emitted, ``committed`` is False) before this returns. With a process
        group it is always resolved before returning, on every device, and committed only if
        every rank's capture is healthy (a collective). Raises RuntimeError when called inside a
        non-default CUDA stream: the capture could not be ordered after that stream's writes.

        After :meth:`observe` was used, the capture commits only once the verdicts of every step
        observed before it are in, none panicked and no anomaly streak runs (:mod:`tolaria.deferred`);
        on CPU that is decided here unless a verdict is still out (``committed`` is then None).
        """
        require_default_stream(device_of(self.model), "TolariaGovernor.snapshot()")
        self._restore.refuse("TolariaGovernor.snapshot()", self._group.agree_on_commit)
        start = time.perf_counter()
        self._resolve()
        info = self._commit.stage(
            self.model, self.optimizer, order_stream=self._hook_handle is None, started=start
        )
        if not self._commit.settles_now:
            return info
        resolved = self._resolve()
        committed = resolved.resolution.committed if resolved is not None else None
        first_bad = resolved.resolution.first_bad if resolved is not None else None
        return replace(info, seconds=time.perf_counter() - start, committed=committed, first_bad=first_bad)

    def _resolve(self, *, drain: bool = False) -> Resolved | None:
        """End the staged capture (:meth:`CommitLifecycle.resolve`; ``drain``: after every
        deferred verdict) and report it: a panic its verdicts found, then the snapshot event
        (and a HEALTH_ALERT when the capture was sick)."""
        resolved, panic = self._commit.resolve(drain=drain)
        self._announce(panic)
        if resolved is not None:
            for event in snapshot_events(resolved, str(device_of(self.model)), self._group.ranked):
                _current_hub().emit(event)
        return resolved

    # -- detect --------------------------------------------------------------------------------
    def check_vital_signs(self, current_loss: object) -> bool:
        """Judge this step's loss; True means panic (call :meth:`execute_rollback`).

        Accepts a Python number or a one-element tensor on any device; raises TypeError naming
        the type otherwise.
        """
        self._clock += 1
        if self._catch_up():
            return True
        panic = self._group.decide(
            self._watch,
            lambda: self._restore.panic(self._watch) or self._watch.observe_loss(current_loss),
            "check_vital_signs",
        )
        if panic is None:
            self.recovery_healthy_step()  # the recovery policy warms the learning rate back
        return self._announce(panic)

    def check_health(self) -> bool:
        """Inspect weights and gradients (call after backward); True means panic.

        Non-finite parameters panic as ``governor_nonfinite_params``, non-finite gradients as
        ``governor_nonfinite_grads``; a global gradient L2 norm that is anomalous against its own
        history ``min_panics_before_rollback`` times in a row panics as ``governor_grad_explosion``.
        One health call covers parameters and gradients together.
        """
        self._last_grad_norm = None
        if self._catch_up():
            return True
        observe, names = self._observe_tensors, self._checked_names
        return self._announce(self._group.decide(self._watch, observe, "check_health", names=names))

    @property
    def last_grad_norm(self) -> float | None:
        """The global gradient L2 norm that the latest :meth:`check_health` computed (not finite
        when a gradient is not), or None when that call checked no gradient (or none ran yet).
        Free to read: the check already brought the per-tensor norms to the host."""
        return self._last_grad_norm

    def observe(self, loss: object, *, step: int | None = None) -> bool:
        """Deferred check of one step, after backward and before the optimizer step: enqueue the
        loss and weights/gradients checks with no host read, then judge earlier steps' verdicts
        that have landed, in step order, through the blocking checks' monitors. True means a
        panic (of this or an earlier step: ``pending_panic.step``) awaits :meth:`execute_rollback`.

        ``loss``: a one-element real tensor or a number; ``step``: this step's label for reports
        (default: a running count). At most ``max_pending_steps`` steps stay unjudged (beyond,
        this waits for the oldest); a capture taken meanwhile commits only once the verdicts
        before it are in and healthy (:mod:`tolaria.commit`). Raises TypeError for a bad
        ``loss``/``step`` (nothing is enqueued), and NotImplementedError with a process group.
        """
        self._clock += 1
        if self._restore.incomplete is not None:
            return self._announce(self._restore.panic(self._watch))
        listing = self._health_listing()
        self._verdicts.push(step, loss, listing, self.health_backend, distributed=self.distributed)
        self._announce(self._commit.consume(wait_for=self._verdicts.pushed - self._verdicts.max_pending))
        return self._watch.pending is not None

    def _catch_up(self) -> bool:
        """Before a blocking check: judge every deferred verdict still out (waiting for it); True
        when that found a panic (the new check then belongs to an abandoned state)."""
        return bool(len(self._verdicts)) and self._announce(self._commit.consume())

    def _health_listing(self) -> Listing:
        """What ``check_health`` inspects: the parameters (when checked), then the gradients
        (listed once per model structure: :mod:`tolaria.health.pairs`)."""
        known, self._known_gradients = self._known_gradients, None  # one check: this step's
        checked = {"parameters": self.check_parameters, "gradients": self.check_gradients}
        return self._checked.listing(self.model, **checked, known=known)

    def _checked_names(self) -> list[str]:
        """The names ``check_health`` may report, the same list on every rank (for consensus)."""
        checked = {"parameters": self.check_parameters, "gradients": self.check_gradients}
        return self._checked.names(self.model, **checked)

    def _observe_tensors(self) -> Panic | None:
        if self._restore.incomplete is not None:
            return self._restore.panic(self._watch)
        listing = self._health_listing()
        if not listing.tensors:
            return None
        report = dispatch.check_listed(listing.names, listing.tensors, backend=self.health_backend).result()
        n_params = listing.n_params
        grad_norm = gradient_norm(report, n_params)  # NaN without gradients
        if len(listing.tensors) > n_params:
            self._last_grad_norm = grad_norm
        return self._watch.observe_tensors(report, n_params, grad_norm=grad_norm)

    def _announce(self, panic: Panic | None) -> bool:
        """Emit the GOVERNOR_PANIC event of ``panic`` (the group's agreed one); False for None."""
        if panic is None:
            return False
        event = panic_event(panic, str(device_of(self.model)), self._group.fault_ranks, self._group.ranked)
        _current_hub().emit(event)
        return True

    # -- restore -------------------------------------------------------------------------------
    def execute_rollback(
        self,
        *,
        env_id: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        triggering_action_id: str | None = None,
        raw_penalty: float | None = None,
        normalized_penalty: float | None = None,
        rollback_severity: float | None = None,
        watch_window_evidence: float | None = None,
        episode_idx: int | None = None,
        skipped_batches: tuple[Any, ...] = (),
    ) -> GovernorReport:
        """Restore the LKG into the model (and the optimizer), prune live seeds, report; then
        apply the recovery policy, if any. First every deferred verdict still out is judged and
        an in-flight capture resolved, so a capture taken after a sick step is discarded and the
        previous LKG comes back. ``optimizer`` defaults to the one the Governor knows (one without
        captured state is cleared, and becomes known). The attribution fields (esper-lite's) and
        ``skipped_batches`` travel in the one GOVERNOR_ROLLBACK event. The steps are
        :func:`tolaria.rollback.perform_rollback`'s; so are the errors (nothing is written when
        the LKG is missing or was edited; drift raises after the restore, the LKG kept).

        Raises TypeError for a non-optimizer, RuntimeError/SnapshotMismatchError as above,
        TrainingAborted when the policy's budget runs out, and DistributedGovernorError with a
        process group when another rank's rollback failed or a rank did not report in time.
        """
        attribution = Attribution(
            triggering_action_id=triggering_action_id,
            raw_penalty=raw_penalty,
            normalized_penalty=normalized_penalty,
            rollback_severity=rollback_severity,
            watch_window_evidence=watch_window_evidence,
            episode_idx=episode_idx,
            skipped_batches=tuple(skipped_batches),
        )
        return self._group.run_rollback(lambda: self._rollback(env_id, optimizer, attribution))

    def _rollback(
        self, env_id: int, optimizer: torch.optim.Optimizer | None, attribution: Attribution
    ) -> GovernorReport:
        optimizer = unwrap_optimizer(optimizer)  # a trainer's wrapper: hooks and state are the real one's
        check_env_id(env_id)
        self._resolve(drain=True)
        target = optimizer if optimizer is not None else self.optimizer
        check_optimizer_params(self.model, target)  # before anything is written
        ladder = self._ladder
        if ladder is not None and ladder.policy.observe_only:  # shadow mode: touch nothing
            action = ladder.after_rollback(self._clock, self._watch.panic_reason or REASON_MANUAL_ROLLBACK)
            return observed_report(self._watch, env_id, action)
        report, _ = perform_rollback(
            store=self._store,
            model=self.model,
            optimizer=target,
            watch=self._watch,
            handout=self._handout,
            hub_source=_current_hub,
            ranked=self._group.ranked,
            fault_ranks=self._group.fault_ranks,
            env_id=env_id,
            attribution=attribution,
            restore_state=self._restore,
            live_entries=self._commit.plans.live_entries,
        )
        self._set_optimizer(target)
        if self._ladder is None:
            return report
        self._ladder.stats.skipped_batches += len(attribution.skipped_batches)
        # May raise TrainingAborted (the rollback has happened; the LKG is saved first).
        action = self._ladder.after_rollback(self._clock, report.panic_reason or REASON_MANUAL_ROLLBACK)
        return replace(report, recovery_action=action)

    def _set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        optimizer = unwrap_optimizer(optimizer)  # a trainer's wrapper: hooks and state are the real one's
        if optimizer is self.optimizer and (self.recovery is None or self._ladder is not None):
            return
        check_optimizer_params(self.model, optimizer)
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self.optimizer = optimizer
        if optimizer is not None:
            self._hook_handle = order_steps_after_captures(optimizer, self._store)
        if self.recovery is not None:  # the ladder's learning-rate hooks follow the optimizer
            self._ladder = RecoveryLadder.rebind(
                self._ladder, self.recovery, optimizer, hub_source=_current_hub, save_lkg=self._save_for_abort
            )

    # -- punish / reset ------------------------------------------------------------------------
    def get_punishment_reward(self) -> float:
        """The reward for causing a rollback: ``-death_penalty``."""
        return -self.death_penalty

    def reset(self) -> None:
        """Start a new episode: judge the deferred verdicts still out (waiting for them) and
        resolve an in-flight capture, clear the loss and gradient histories and any pending
        panic, then take a fresh snapshot of the model as it is now."""
        self._resolve(drain=True)
        self._watch.reset()
        self.snapshot()


__all__ = ["REASON_MANUAL_ROLLBACK", "GovernorReport", "SnapshotInfo", "TolariaGovernor"]
