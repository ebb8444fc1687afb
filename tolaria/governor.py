"""TolariaGovernor: the fail-safe watchdog a training loop calls every step.

"Fail-safe" means three things here:

* **detect** — ``check_vital_signs(loss)`` watches the loss (NaN/Inf, a lobotomy back to the
  random-guess loss, statistical divergence) and ``check_health()`` watches the weights and
  gradients (non-finite values, gradient-norm explosions);
* **restore** — ``execute_rollback()`` writes the Last Known Good (LKG) state back into the
  model, bit-exact and in place, together with the optimizer's state, and prunes experimental
  seeds that may have caused the failure;
* **punish** — ``get_punishment_reward()`` gives an RL controller the negative reward for the
  failure it caused.

The Governor only decides *when*; :mod:`tolaria.vitals` judges losses, :mod:`tolaria.health`
judges tensors, :mod:`tolaria.snapshot` keeps the bytes, and every decision is reported through
the telemetry hub, reached via the module-level name ``get_hub`` at call time so that users can
patch ``tolaria.governor.get_hub``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tolaria import health
from tolaria import telemetry as tm
from tolaria.constants import (
    DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD,
    DEFAULT_GOVERNOR_DEATH_PENALTY,
    DEFAULT_GOVERNOR_HISTORY_WINDOW,
    DEFAULT_GOVERNOR_LOSS_MULTIPLIER,
    DEFAULT_GOVERNOR_SENSITIVITY,
    DEFAULT_MIN_PANICS_BEFORE_ROLLBACK,
)
from tolaria.snapshot import Resolution, make_store
from tolaria.snapshot import store as snap
from tolaria.telemetry import get_hub
from tolaria.vitals import Panic, Watch, check_number

logger = logging.getLogger(__name__)

#: ``GovernorReport.reason`` of a rollback that no panic preceded.
REASON_MANUAL_ROLLBACK = "governor_manual_rollback"
SEED_SLOTS_PREFIX = "seed_slots."


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
    "cleared" or "untouched".
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


@dataclass(frozen=True)
class SnapshotInfo:
    """What one :meth:`TolariaGovernor.snapshot` did. ``keys_captured`` are model state-dict keys
    (optimizer state travels too but is not listed); ``keys_excluded`` belong to non-fossilized
    seeds. ``bytes`` counts tied tensors once. ``seconds`` is how long the call blocked the host.
    ``committed`` is None while an asynchronous (CUDA) capture is still in flight: it is then
    verified at the next snapshot, rollback or ``last_good_state`` read."""

    keys_captured: tuple[str, ...]
    keys_excluded: tuple[str, ...]
    bytes: int
    backend: str
    seconds: float
    committed: bool | None
    first_bad: str | None = None


@dataclass(frozen=True)
class _CaptureMeta:
    """Travels with a capture through the store and commits atomically with its tensors."""

    model_keys: tuple[str, ...]
    extras: dict[str, object]
    optimizer: snap.OptimizerSnapshot | None


def _emit(event_type: tm.TelemetryEventType, severity: tm.Severity, message: str, data: Any) -> None:
    # get_hub is resolved from this module's globals at call time, so patching it works.
    get_hub().emit(tm.TelemetryEvent(event_type, severity, message, data))


def _device_of(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_optimizer(optimizer: object) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


def _is_fossilized(slot: object) -> bool:
    stage = getattr(getattr(slot, "state", None), "stage", None)
    return str(getattr(stage, "name", stage)).upper() == "FOSSILIZED"


def _model_entries(
    model: nn.Module,
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, object], tuple[str, ...]]:
    """The model's state split for a snapshot, leaving out everything of non-fossilized seeds:
    their ``seed.`` and ``alpha_schedule.`` subtrees and their ``_extra_state``."""
    slots: Any = getattr(model, "seed_slots", None)
    prefixes, exact = [], set()
    for slot_id, slot in slots.items() if hasattr(slots, "items") else []:
        if not _is_fossilized(slot):
            base = f"{SEED_SLOTS_PREFIX}{slot_id}."
            prefixes += [base + "seed.", base + "alpha_schedule."]
            exact.add(base + "_extra_state")
    starts = tuple(prefixes)
    return snap.state_dict_entries(model, lambda key: key in exact or key.startswith(starts))


class _WatchSetting:
    """A drop-in attribute (``gov.sensitivity = 4.0`` keeps working) that lives in the Watch."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, gov: Any, owner: type | None = None) -> Any:
        return self if gov is None else gov._watch.setting(self.name)

    def __set__(self, gov: Any, value: float) -> None:
        gov._watch.configure(self.name, value)


class TolariaGovernor:
    """Watches one model, keeps its Last Known Good state, and rolls it back on failure.

    The positional signature is the original Governor's (a drop-in replacement). New options
    are keyword-only: ``optimizer`` (its state is captured and restored with the model, and a
    step pre-hook keeps its updates ordered after in-flight captures), ``check_parameters`` /
    ``check_gradients`` (what ``check_health()`` inspects), ``snapshot_backend`` ("auto",
    "native", "reference") and ``health_backend`` ("auto", "triton", "reference").

    Raises TypeError/ValueError naming the argument for bad input (e.g. ``history_window < 10``)
    and RuntimeError when ``snapshot_backend="native"`` is unavailable. The constructor takes
    the first snapshot.
    """

    sensitivity = _WatchSetting()
    multiplier = _WatchSetting()
    absolute_threshold = _WatchSetting()
    min_panics_before_rollback = _WatchSetting()

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
            sensitivity=sensitivity,
            multiplier=multiplier,
            absolute_threshold=absolute_threshold,
            history_window=history_window,
            min_panics_before_rollback=min_panics_before_rollback,
            random_guess_loss=random_guess_loss,
        )
        self.check_parameters = check_parameters
        self.check_gradients = check_gradients
        self.health_backend = health_backend
        self._store = make_store(snapshot_backend, device=_device_of(model), health_backend=health_backend)
        self._pending_info: SnapshotInfo | None = None
        self._lkg_cache: tuple[object, dict[str, torch.Tensor]] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._hook_handle: Any = None
        self._set_optimizer(optimizer)
        self.snapshot()

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
    def snapshot_backend(self) -> str:
        return self._store.backend

    @property
    def last_good_state(self) -> dict[str, torch.Tensor] | None:
        """The committed LKG: state-dict key → CPU tensor (no grad; pinned for CUDA models), or
        None before the first commit. Resolves an in-flight capture first. A new dict per
        commit; its tensors are read-only views, valid at least until the next commit."""
        self._resolve()
        source = self._store.last_good_state
        if source is None:
            return None
        if self._lkg_cache is None or self._lkg_cache[0] is not source:
            view = {k: v for k, v in source.items() if not k.startswith(snap.OPTIMIZER_KEY_PREFIX)}
            self._lkg_cache = (source, view)
        return self._lkg_cache[1]

    # -- snapshot ------------------------------------------------------------------------------
    def snapshot(self) -> SnapshotInfo:
        """Capture the model (minus non-fossilized seeds) and the known optimizer's state.

        On CPU the capture is verified and committed (or rejected: the previous LKG stays, a
        HEALTH_ALERT is emitted, ``committed`` is False) before this returns. Raises
        RuntimeError when called inside a non-default CUDA stream: the capture could not be
        ordered after that stream's pending writes.
        """
        snap.require_default_stream(_device_of(self.model), "TolariaGovernor.snapshot()")
        start = time.perf_counter()
        self._resolve()
        tensors, extras, excluded = _model_entries(self.model)
        opt_tensors, opt_snapshot = snap.optimizer_entries(self.optimizer)
        keys = tuple(k for k, _ in tensors) + tuple(extras)
        meta = _CaptureMeta(keys, copy.deepcopy(extras), opt_snapshot)
        ticket = self._store.capture(tensors + opt_tensors, meta=meta)
        info = SnapshotInfo(
            keys, excluded, ticket.nbytes, self._store.backend, time.perf_counter() - start, None
        )
        self._pending_info = info
        if ticket.in_flight:
            return info
        resolution = self._resolve()
        committed = resolution.committed if resolution is not None else None
        first_bad = resolution.first_bad if resolution is not None else None
        return replace(info, seconds=time.perf_counter() - start, committed=committed, first_bad=first_bad)

    def _resolve(self) -> Resolution | None:
        """Resolve the store's pending capture and report it (snapshot event; alert if sick)."""
        resolution = self._store.resolve()
        info, self._pending_info = self._pending_info, None
        if resolution is None or info is None:
            return resolution
        device, ok = str(_device_of(self.model)), resolution.committed
        _emit(
            tm.TelemetryEventType.GOVERNOR_SNAPSHOT,
            tm.Severity.DEBUG if ok else tm.Severity.WARNING,
            "snapshot committed" if ok else "snapshot rejected: non-finite values",
            tm.GovernorSnapshotPayload(
                device, info.backend, len(info.keys_captured), len(info.keys_excluded), info.bytes,
                info.seconds, ok, resolution.first_bad,
            ),
        )  # fmt: skip
        if not ok:
            report = resolution.report
            bad = (
                ()
                if report is None
                else tuple(n for n, c in zip(report.names, report.nonfinite, strict=True) if c)
            )
            _emit(
                tm.TelemetryEventType.HEALTH_ALERT,
                tm.Severity.ERROR,
                f"snapshot not committed, first non-finite tensor: {resolution.first_bad}",
                tm.HealthAlertPayload(
                    "snapshot", device, resolution.first_bad, 0 if report is None else report.total_nonfinite,
                    bad[:32], "" if report is None else report.backend,
                ),
            )  # fmt: skip
        return resolution

    # -- detect --------------------------------------------------------------------------------
    def check_vital_signs(self, loss: object) -> bool:
        """Judge this step's loss; True means panic (call :meth:`execute_rollback`).

        Accepts a Python number or a one-element tensor on any device; raises TypeError naming
        the type otherwise.
        """
        panic = self._watch.observe_loss(loss)
        return panic is not None and self._announce(panic)

    def check_health(self) -> bool:
        """Inspect weights and gradients (call after backward); True means panic.

        Non-finite parameters panic as ``governor_nonfinite_params``, non-finite gradients as
        ``governor_nonfinite_grads``; a global gradient L2 norm that is anomalous against its own
        history ``min_panics_before_rollback`` times in a row panics as ``governor_grad_explosion``.
        One health call covers parameters and gradients together.
        """
        params = list(self.model.named_parameters())
        pairs: list[tuple[str, torch.Tensor]] = list(params) if self.check_parameters else []
        n_params = len(pairs)
        if self.check_gradients:
            pairs += [(f"{name}.grad", p.grad) for name, p in params if p.grad is not None]
        if not pairs:
            return False
        panic = self._watch.observe_tensors(
            health.check_tensors(pairs, backend=self.health_backend), n_params
        )
        return panic is not None and self._announce(panic)

    def _announce(self, panic: Panic) -> bool:
        sick = f" (first sick tensor: {panic.first_bad})" if panic.first_bad else ""
        _emit(
            tm.TelemetryEventType.GOVERNOR_PANIC,
            tm.Severity.ERROR,
            f"panic: {panic.reason}{sick}",
            tm.GovernorPanicPayload(
                panic.reason, str(_device_of(self.model)), panic.loss, panic.threshold, panic.consecutive,
                panic.first_bad, panic.grad_norm,
            ),
        )  # fmt: skip
        return True

    # -- restore -------------------------------------------------------------------------------
    def execute_rollback(
        self, *, env_id: int = 0, optimizer: torch.optim.Optimizer | None = None
    ) -> GovernorReport:
        """Restore the LKG into the model (and the optimizer), prune live seeds, report.

        Order: resolve an in-flight capture; restore the host and fossilized seeds in place;
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
        """
        _check_optimizer(optimizer)
        self._resolve()
        saved, meta = self._store.last_good_state, self._store.lkg_meta
        if saved is None or not isinstance(meta, _CaptureMeta):
            raise RuntimeError("no Last Known Good snapshot to roll back to (no snapshot was ever committed)")
        target_opt = optimizer if optimizer is not None else self.optimizer
        tensors, extras, _ = _model_entries(self.model)
        opt_targets, finish_optimizer = snap.optimizer_restore_plan(target_opt, meta.optimizer, saved)
        self._store.restore(tensors + opt_targets)
        snap.restore_extra_state(self.model, meta.extras, extras)
        optimizer_state = finish_optimizer()
        self._set_optimizer(target_opt)
        pruned = self._prune_live_seeds()
        live_tensors, live_extras, _ = _model_entries(self.model)
        live_keys = [k for k, _ in live_tensors] + list(live_extras)
        saved_set, live_set = set(meta.model_keys), set(live_keys)
        missing = tuple(k for k in live_keys if k not in saved_set)
        unexpected = tuple(k for k in meta.model_keys if k not in live_set)
        panic, panicked = self._watch.panic_for_rollback(REASON_MANUAL_ROLLBACK)
        panic_reason = panic.reason if panicked else None
        _emit(
            tm.TelemetryEventType.GOVERNOR_ROLLBACK,
            tm.Severity.WARNING,
            f"rolled back to the last known good state ({panic.reason})",
            tm.GovernorRollbackPayload(
                env_id, str(_device_of(self.model)), panic.reason, panic.loss, panic.threshold,
                max(panic.consecutive, self.consecutive_panics), panic_reason, missing, unexpected,
            ),
        )  # fmt: skip
        drift_missing = [k for k in missing if not k.startswith(SEED_SLOTS_PREFIX)]
        drift_unexpected = [k for k in unexpected if not k.startswith(SEED_SLOTS_PREFIX)]
        if drift_missing or drift_unexpected:
            raise RuntimeError(
                f"architecture drift: keys outside {SEED_SLOTS_PREFIX!r} are missing {drift_missing} or "
                f"unexpected {drift_unexpected}; matching weights were restored and the LKG is kept"
            )
        self._watch.clear_panic()
        return GovernorReport(
            panic.reason, panic.loss, panic.threshold, 0, True, panic_reason, env_id, missing, unexpected,
            pruned, optimizer_state,
        )  # fmt: skip

    def _prune_live_seeds(self) -> tuple[str, ...]:
        slots: Any = getattr(self.model, "seed_slots", None)
        pruned: list[str] = []
        for slot_id, slot in list(slots.items()) if hasattr(slots, "items") else []:
            if (
                getattr(slot, "seed", None) is None
                or getattr(slot, "state", None) is None
                or _is_fossilized(slot)
            ):
                continue
            try:
                slot.prune("governor_rollback", initiator="governor")
                pruned.append(str(slot_id))
            except Exception:
                logger.exception("pruning seed slot %r after a rollback failed; continuing", slot_id)
        return tuple(pruned)

    def _set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        _check_optimizer(optimizer)
        if optimizer is self.optimizer:
            return
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self.optimizer = optimizer
        if optimizer is not None:
            store = self._store

            def wait_for_capture(_opt: object, _args: object, _kwargs: object) -> None:
                # The step writes the parameters an in-flight capture may still be reading.
                store.make_stream_wait()

            self._hook_handle = optimizer.register_step_pre_hook(wait_for_capture)

    # -- punish / reset ------------------------------------------------------------------------
    def get_punishment_reward(self) -> float:
        """The reward for causing a rollback: ``-death_penalty``."""
        return -self.death_penalty

    def reset(self) -> None:
        """Start a new episode: clear the loss and gradient histories and any pending panic,
        then take a fresh snapshot of the model as it is now."""
        self._watch.reset()
        self.snapshot()


__all__ = ["REASON_MANUAL_ROLLBACK", "GovernorReport", "SnapshotInfo", "TolariaGovernor"]
