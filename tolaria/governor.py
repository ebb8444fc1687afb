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
from collections import deque
from dataclasses import dataclass, replace
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
from tolaria.deferred import VerdictQueue, check_max_pending
from tolaria.distributed import make_decisions
from tolaria.snapshot import seeds
from tolaria.snapshot.entries import (
    OPTIMIZER_KEY_PREFIX,
    CaptureMeta,
    check_optimizer,
    device_of,
    key_drift,
    order_steps_after_captures,
    restore_contents,
)
from tolaria.snapshot.factory import make_store
from tolaria.snapshot.store import require_default_stream
from tolaria.telemetry import TelemetryHub, get_hub
from tolaria.telemetry.events import panic_event, rollback_event, snapshot_events
from tolaria.telemetry.payloads import GovernorRollbackPayload
from tolaria.watch import Panic, Watch, gradient_norm

logger = logging.getLogger(__name__)

#: ``GovernorReport.reason`` of a rollback that no panic preceded.
REASON_MANUAL_ROLLBACK = "governor_manual_rollback"


@dataclass(frozen=True)
class GovernorReport:
    """The result of one :meth:`TolariaGovernor.execute_rollback`.

    The first five fields are the original Governor's. ``reason`` is the panic reason that led
    here (``governor_nan``, ``governor_divergence``, ...) or ``governor_manual_rollback``.
    ``loss_at_panic`` is NaN for a rollback with no preceding loss panic (manual, or a health
    panic, which has no loss). ``consecutive_panics`` is the count AFTER the rollback, i.e. 0;
    the GOVERNOR_ROLLBACK telemetry payload carries the count at the panic. ``missing_keys`` /
    ``unexpected_keys`` are state-dict keys with no saved value / no live tensor (only keys
    under ``seed_slots.`` can appear here: others raise). ``optimizer_state`` is "restored",
    "cleared" or "untouched". ``panic_step`` is the label of the observed step whose deferred
    verdict panicked (see :meth:`TolariaGovernor.observe`), None after a blocking check.
    """

    reason: str
    loss_at_panic: float
    loss_threshold: float
    consecutive_panics: int
    rollback_occurred: bool
    panic_reason: str | None = None
    env_id: int = 0
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    pruned_slots: tuple[str, ...] = ()
    optimizer_state: str = "untouched"
    panic_step: int | None = None


class _Setting:
    """A drop-in attribute (``gov.sensitivity = 4.0`` keeps working): one field of the
    Governor's :class:`WatchConfig`; setting it builds a new, validated config."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, gov: Any, owner: type | None = None) -> Any:
        return self if gov is None else getattr(gov.config, self.name)

    def __set__(self, gov: Any, value: float) -> None:
        gov.config = replace(gov.config, **{self.name: value})


def _current_hub() -> TelemetryHub:
    """This module's ``get_hub``, looked up at call time (patchable); the store's events use it."""
    return get_hub()


class TolariaGovernor:
    """Watches one model, keeps its Last Known Good state, and rolls it back on failure.

    The positional signature is the original Governor's (a drop-in replacement). New options
    are keyword-only: ``optimizer`` (its state is captured and restored with the model, and a
    step pre-hook keeps its updates ordered after in-flight captures), ``check_parameters`` /
    ``check_gradients`` (what ``check_health()`` inspects), ``snapshot_backend`` ("auto",
    "native", "reference"), ``health_backend`` ("auto", "triton", "reference"), and
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

    sensitivity = _Setting()
    multiplier = _Setting()
    absolute_threshold = _Setting()
    min_panics_before_rollback = _Setting()
    grad_norm_multiplier = _Setting()

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if health_backend not in health.BACKENDS:
            raise ValueError(f"health_backend must be one of {health.BACKENDS}, got {health_backend!r}")
        for name, flag in (("check_parameters", check_parameters), ("check_gradients", check_gradients)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {type(flag).__name__}")
        self.model = model
        self.death_penalty = check_number("death_penalty", death_penalty)
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
        self._store = make_store(snapshot_backend, device=device_of(model), health_backend=health_backend)
        self._store.hub_source = _current_hub
        self._commit = CommitLifecycle(self._store, self._group, self._verdicts, self._watch)
        self._last_grad_norm: float | None = None
        self._lkg_cache: tuple[object, dict[str, torch.Tensor]] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._hook_handle: Any = None
        self._set_optimizer(optimizer)
        self.snapshot()

    @property
    def config(self) -> WatchConfig:
        """The detector settings in force (frozen; assign a new one to change them)."""
        return self._watch.config

    @config.setter
    def config(self, config: WatchConfig) -> None:
        if not isinstance(config, WatchConfig):
            raise TypeError(f"config must be a tolaria.config.WatchConfig, got {type(config).__name__}")
        self._watch.configure(config)

    @property
    def random_guess_loss(self) -> float:
        return self._watch.loss.random_guess_loss

    @property
    def loss_history(self) -> deque[float]:
        """Recent healthy losses (a deque with ``maxlen=history_window``)."""
        return self._watch.loss.history

    @property
    def consecutive_panics(self) -> int:
        return self._watch.loss.consecutive_panics

    @consecutive_panics.setter
    def consecutive_panics(self, value: int) -> None:
        self._watch.loss.consecutive_panics = value

    @property
    def anomaly_streak(self) -> int:
        """Consecutive anomalies of the loss or gradient-norm monitor, as of the verdicts judged."""
        return self._watch.anomaly_streak

    @property
    def pending_panic(self) -> Panic | None:
        """The panic awaiting :meth:`execute_rollback` (``.step``: a deferred verdict's step)."""
        return self._watch.pending

    @property
    def pending_verdicts(self) -> int:
        """Observed steps whose verdicts are not in yet (<= ``max_pending_steps`` after observe())."""
        return len(self._verdicts)

    @property
    def max_pending_steps(self) -> int:
        return self._verdicts.max_pending

    @max_pending_steps.setter
    def max_pending_steps(self, value: int) -> None:
        self._verdicts.max_pending = check_max_pending(value)

    @property
    def distributed(self) -> bool:
        """Whether decisions are agreed with a process group (then :meth:`observe` is refused)."""
        return self._group.distributed

    @property
    def snapshot_backend(self) -> str:
        return self._store.backend

    @property
    def last_good_state(self) -> dict[str, torch.Tensor] | None:
        """The committed LKG: state-dict key → CPU tensor (no grad; pinned for CUDA models), or
        None before the first commit. Resolves an in-flight capture first. A new dict per
        commit; its tensors are read-only views, valid at least until the next commit. Drains
        the deferred verdicts first (waiting for them), so a gated capture is decided."""
        self._resolve(drain=True)
        source = self._store.last_good_state
        if source is None:
            return None
        if self._lkg_cache is None or self._lkg_cache[0] is not source:
            view = {k: v for k, v in source.items() if not k.startswith(OPTIMIZER_KEY_PREFIX)}
            self._lkg_cache = (source, view)
        return self._lkg_cache[1]

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
        if self._catch_up():
            return True
        panic = self._group.decide(
            self._watch, lambda: self._watch.observe_loss(current_loss), "check_vital_signs"
        )
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
        return self._announce(self._group.decide(self._watch, self._observe_tensors, "check_health"))

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
        pairs, n_params = self._health_pairs()
        self._verdicts.push(step, loss, pairs, n_params, self.health_backend, distributed=self.distributed)
        self._announce(self._commit.consume(wait_for=self._verdicts.pushed - self._verdicts.max_pending))
        return self._watch.pending is not None

    def _catch_up(self) -> bool:
        """Before a blocking check: judge every deferred verdict still out (waiting for it); True
        when that found a panic (the new check then belongs to an abandoned state)."""
        return bool(len(self._verdicts)) and self._announce(self._commit.consume())

    def _health_pairs(self) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """What ``check_health`` inspects: the parameters (when checked), then the gradients."""
        params = list(self.model.named_parameters())
        pairs: list[tuple[str, torch.Tensor]] = list(params) if self.check_parameters else []
        n_params = len(pairs)
        if self.check_gradients:
            pairs += [(f"{name}.grad", p.grad) for name, p in params if p.grad is not None]
        return pairs, n_params

    def _observe_tensors(self) -> Panic | None:
        pairs, n_params = self._health_pairs()
        report = health.check_tensors(pairs, backend=self.health_backend) if pairs else None
        if report is None:
            return None
        if len(pairs) > n_params:
            self._last_grad_norm = gradient_norm(report, n_params)
        return self._watch.observe_tensors(report, n_params)

    def _announce(self, panic: Panic | None) -> bool:
        """Emit the GOVERNOR_PANIC event of ``panic`` (the group's agreed one); False for None."""
        if panic is None:
            return False
        event = panic_event(panic, str(device_of(self.model)), self._group.fault_ranks, self._group.ranked)
        _current_hub().emit(event)
        return True

    # -- restore -------------------------------------------------------------------------------
    def execute_rollback(
        self, *, env_id: int = 0, optimizer: torch.optim.Optimizer | None = None
    ) -> GovernorReport:
        """Restore the LKG into the model (and the optimizer), prune live seeds, report.

        Order: consume every deferred verdict still out (waiting for it) and resolve an
        in-flight capture behind its gate, so a capture taken after a sick step is discarded and
        the previous committed LKG comes back; restore the host and fossilized seeds in place;
        restore the optimizer state captured with the LKG (``optimizer`` defaults to the one
        the Governor knows; one without captured state is cleared entirely, and becomes known
        for later snapshots); prune every live seed (failures are logged, not raised); emit
        exactly one GOVERNOR_ROLLBACK carrying any key mismatches.

        Raises:
            TypeError: ``optimizer`` is not a torch.optim.Optimizer.
            RuntimeError: there is no LKG (nothing is touched); or keys outside ``seed_slots.``
                are missing/unexpected (architecture drift) — raised after the restore and the
                event; the LKG and the panic state stay, so the rollback can be retried.
            SnapshotMismatchError: a saved tensor's shape/dtype no longer fits (nothing written).
            DistributedGovernorError: with a process group, on the ranks whose own rollback
                succeeded when another rank's failed, or when a rank did not report in time.
        """
        return self._group.run_rollback(lambda: self._rollback(env_id, optimizer))

    def _rollback(self, env_id: int, optimizer: torch.optim.Optimizer | None) -> GovernorReport:
        check_optimizer(optimizer)
        self._resolve(drain=True)
        saved, meta = self._store.last_good_state, self._store.lkg_meta
        if saved is None or not isinstance(meta, CaptureMeta):
            raise RuntimeError("no Last Known Good snapshot to roll back to (no snapshot was ever committed)")
        target_opt = optimizer if optimizer is not None else self.optimizer
        optimizer_state = restore_contents(self._store, self.model, target_opt, saved, meta)
        self._set_optimizer(target_opt)
        pruned = seeds.prune_live_seeds(self.model, logger)
        missing, unexpected = key_drift(self.model, meta)
        panic, panicked = self._watch.panic_for_rollback(REASON_MANUAL_ROLLBACK)
        panic_reason = panic.reason if panicked else None
        payload = GovernorRollbackPayload(
            env_id=env_id,
            device=str(device_of(self.model)),
            reason=panic.reason,
            loss_at_panic=panic.loss,
            loss_threshold=panic.threshold,
            consecutive_panics=max(panic.consecutive, self.consecutive_panics),
            panic_reason=panic_reason,
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
        _current_hub().emit(rollback_event(payload, self._group.fault_ranks, self._group.ranked))
        seeds.raise_on_drift(missing, unexpected)
        seeds.raise_on_sick_unsaved_fossils(self.model, missing)
        self._watch.clear_panic()
        return GovernorReport(
            reason=panic.reason,
            loss_at_panic=panic.loss,
            loss_threshold=panic.threshold,
            consecutive_panics=0,
            rollback_occurred=True,
            panic_reason=panic_reason,
            env_id=env_id,
            missing_keys=missing,
            unexpected_keys=unexpected,
            pruned_slots=pruned,
            optimizer_state=optimizer_state,
            panic_step=panic.step if panicked else None,
        )

    def _set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        check_optimizer(optimizer)
        if optimizer is self.optimizer:
            return
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self.optimizer = optimizer
        if optimizer is not None:
            self._hook_handle = order_steps_after_captures(optimizer, self._store)

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
