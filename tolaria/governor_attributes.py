"""The attribute surface of :class:`tolaria.governor.TolariaGovernor`: views of its parts.

The original Governor's attributes (``sensitivity`` ... ``consecutive_panics``, ``loss_history``,
and the panic state esper-lite's trainer reads and writes: ``_panic_reason``, ``_panic_loss``,
``_pending_panic``) and tolaria's own (``config``, ``pending_panic``, ``anomaly_streak``,
``max_pending_steps``, ...). Each reads or writes the part that owns it (the Watch, the verdict
queue, the store, the process group); none keeps state of its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tolaria.config import WatchConfig
from tolaria.deferred import check_max_pending
from tolaria.recovery.ladder import RecoveryStats
from tolaria.snapshot.entries import OPTIMIZER_KEY_PREFIX
from tolaria.snapshot.handout import LkgHandout

if TYPE_CHECKING:
    import torch

    from tolaria.deferred import VerdictQueue
    from tolaria.distributed import LocalDecisions
    from tolaria.recovery.ladder import RecoveryLadder
    from tolaria.restore_state import RestoreState
    from tolaria.snapshot.store import SnapshotStore
    from tolaria.watch import Panic, Watch


class _Setting:
    """A drop-in attribute (``gov.sensitivity = 4.0`` keeps working): one field of the
    Governor's :class:`WatchConfig`; setting it builds a new, validated config."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, gov: Any, owner: type | None = None) -> Any:
        return self if gov is None else getattr(gov.config, self.name)

    def __set__(self, gov: Any, value: float) -> None:
        gov.config = replace(gov.config, **{self.name: value})


class GovernorAttributes:
    """Mixed into the Governor, which sets the parts annotated below and resolves captures."""

    _watch: Watch
    _verdicts: VerdictQueue
    _store: SnapshotStore
    _group: LocalDecisions
    _handout: LkgHandout | None
    _ladder: RecoveryLadder | None
    _restore: RestoreState

    def _resolve(self, *, drain: bool = False) -> object: ...

    sensitivity = _Setting()
    multiplier = _Setting()
    absolute_threshold = _Setting()
    min_panics_before_rollback = _Setting()
    grad_norm_multiplier = _Setting()

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

    # The original Governor's panic state, read by esper-lite's trainer and written by its tests:
    # the real state (a write changes what the next rollback reports), kept by the Watch.
    @property
    def _panic_reason(self) -> str | None:
        return self._watch.panic_reason

    @_panic_reason.setter
    def _panic_reason(self, value: str | None) -> None:
        self._watch.set_panic_state(
            reason=value, loss=self._watch.panic_loss, anomaly_pending=self._pending_panic
        )

    @property
    def _panic_loss(self) -> float | None:
        return self._watch.panic_loss

    @_panic_loss.setter
    def _panic_loss(self, value: float | None) -> None:
        self._watch.set_panic_state(
            reason=self._panic_reason, loss=value, anomaly_pending=self._pending_panic
        )

    @property
    def _pending_panic(self) -> bool:
        return self._watch.anomaly_pending

    @_pending_panic.setter
    def _pending_panic(self, value: bool) -> None:
        self._watch.set_panic_state(reason=self._panic_reason, loss=self._panic_loss, anomaly_pending=value)

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
    def restore_incomplete(self) -> str | None:
        """What interrupted the last rollback half-way (None when the model is whole). While it
        is set, ``snapshot()`` refuses, every check panics (``governor_restore_incomplete``) and
        the next ``execute_rollback()`` completes the restore (:mod:`tolaria.restore_state`): a
        ``finally:`` that checkpoints should look here first."""
        return self._restore.incomplete

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
        if self._handout is None or self._handout.source is not source:
            view = {k: v for k, v in source.items() if not k.startswith(OPTIMIZER_KEY_PREFIX)}
            self._handout = LkgHandout(source, view)
        return self._handout.view

    @property
    def recovery_stats(self) -> RecoveryStats:
        """What the recovery policy has done (all zero without one): for loggers."""
        return RecoveryStats() if self._ladder is None else self._ladder.stats


__all__ = ["GovernorAttributes"]
