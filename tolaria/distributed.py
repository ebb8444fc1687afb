"""Rank consensus: every rank of a process group takes the same decision at the same time.

Under DDP or FSDP one Governor runs on every rank, each watching its own loss, parameters and
gradients and keeping its own Last Known Good. If one rank rolled back alone, the replicas would
silently diverge, so :class:`RankConsensus` agrees every decision over ``torch.distributed``
with ONE ``all_reduce(MAX)`` of a ``world_size``-slot int64 tensor in which each rank writes only
its own slot (its reason code, :data:`REASON_PRIORITY`): every rank then holds every rank's
verdict, the highest code is the group's reason, the non-zero slots name the ranks that saw the
fault, and a rank that raised writes :data:`CODE_RANK_ERROR` so its peers raise too.

* **Checks** (:meth:`RankConsensus.decide`): a rank that saw nothing while another panicked
  rewinds its loss and gradient-norm monitors, so a step the group rolled back enters no rank's
  history. A health panic's slot also carries which tensor was sick first (its position in the
  names every rank checks, and a checksum of the name), so every rank's panic names it, e.g. the
  full name of a parameter whose shard on rank 1 went NaN under FSDP2; a rank whose own list
  holds another name there (a pipeline stage) names none.
* **Commits** (:meth:`RankConsensus.agree_on_commit`): one sick capture anywhere vetoes the
  commit everywhere (:mod:`tolaria.commit` asks).
* **Rollbacks** (:meth:`RankConsensus.run_rollback`): a rank whose rollback raised makes every
  other rank raise :class:`DistributedGovernorError` naming it.

Every exchange waits at most the process group's timeout (``init_process_group(timeout=...)``
or a dedicated ``dist.new_group(backend="gloo", timeout=...)`` passed as ``process_group``); a
dead or hung peer becomes a :class:`DistributedGovernorError`, not a hang. Every rank must call
the Governor's collective methods in the same order. :class:`LocalDecisions` is the same
interface without a group: no collective, ever.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tolaria import telemetry as tm
from tolaria.rank_codes import (
    CODE_BITS,
    CODE_HEALTHY,
    CODE_MASK,
    CODE_RANK_ERROR,
    REASON_PRIORITY,
    decode_slot,
    encode_slot,
    reason_code,
    reason_of,
)
from tolaria.vitals import REASON_GRAD_EXPLOSION, SpikeDetector
from tolaria.watch import Panic, Watch

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_P = TypeVar("_P")

PROCESS_GROUP_CHOICES = "None, 'auto' or a torch.distributed.ProcessGroup"


class DistributedGovernorError(RuntimeError):
    """Raised on a rank when the group cannot agree: another rank raised (``ranks`` names the
    global ranks), or an exchange did not complete within the timeout (``ranks`` is empty)."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks


def resolve_process_group(process_group: object) -> Any:
    """The group the Governor agrees with: None (never any collective); ``"auto"``, the default
    group when ``torch.distributed`` is initialized and None otherwise; or the given
    ``ProcessGroup``. Raises TypeError/ValueError naming ``process_group`` otherwise."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be {PROCESS_GROUP_CHOICES}, got {process_group!r}")
        ready = dist.is_available() and dist.is_initialized()
        return dist.group.WORLD if ready else None
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be {PROCESS_GROUP_CHOICES}, got {type(process_group).__name__}")
    return process_group


@dataclasses.dataclass(frozen=True)
class RankedPanicPayload(tm.GovernorPanicPayload):
    """A panic agreed by a process group: ``rank`` emitted it, ``fault_ranks`` saw the fault
    (global ranks), ``world_size`` is the group's size."""

    rank: int = 0
    world_size: int = 1
    fault_ranks: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RankedRollbackPayload(tm.GovernorRollbackPayload):
    """A rollback taken by every rank of a process group; ``fault_ranks`` saw the panic."""

    rank: int = 0
    world_size: int = 1
    fault_ranks: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RankedSnapshotPayload(tm.GovernorSnapshotPayload):
    """A snapshot resolved by every rank together; ``fault_ranks`` vetoed it (sick capture)."""

    rank: int = 0
    world_size: int = 1
    fault_ranks: tuple[int, ...] = ()


_RANKED: dict[type, type] = {
    tm.GovernorPanicPayload: RankedPanicPayload,
    tm.GovernorRollbackPayload: RankedRollbackPayload,
    tm.GovernorSnapshotPayload: RankedSnapshotPayload,
}


class _MonitorState:
    """The loss and gradient-norm monitors' histories and anomaly runs, to rewind a check."""

    def __init__(self, watch: Watch) -> None:
        self.saved = [
            (detector, list(detector.history), detector.consecutive)
            for detector in (watch.loss.spikes, watch.grad_norms)
        ]

    def restore(self) -> None:
        for detector, history, consecutive in self.saved:
            _rewind(detector, history, consecutive)


def _rewind(detector: SpikeDetector, history: list[float], consecutive: int) -> None:
    detector.history.clear()
    detector.history.extend(history)
    detector.consecutive = consecutive


class LocalDecisions:
    """How a Governor without a process group decides: on this process's verdicts alone.

    :class:`RankConsensus` overrides every method with an agreed version; this one never issues
    a collective (``process_group=None``)."""

    #: Whether decisions are agreed with other ranks.
    distributed = False
    #: Global ranks behind the latest agreed panic (empty after a rollback; always empty here).
    fault_ranks: tuple[int, ...] = ()
    #: Global ranks that vetoed the latest snapshot (always empty here).
    veto_ranks: tuple[int, ...] = ()

    def decide(
        self,
        watch: Watch,
        observe: Callable[[], Panic | None],
        what: str,
        *,
        names: Callable[[], Sequence[str]] | None = None,
    ) -> Panic | None:
        """This rank's verdict (``observe`` keeps a panic as ``watch.pending``); ``names`` lists
        the tensors a health check covers (used with a group, to name a peer's sick tensor)."""
        return observe()

    def agree_on_commit(self, healthy: bool) -> bool:
        """Whether the capture may be committed: alone, exactly when it is healthy."""
        return healthy

    def run_rollback(self, rollback: Callable[[], _T]) -> _T:
        """Run this rank's rollback."""
        return rollback()

    def ranked(self, payload: _P, fault_ranks: tuple[int, ...]) -> _P:
        """A telemetry payload, as it is without a group."""
        return payload


def make_decisions(process_group: object) -> LocalDecisions:
    """The Governor's decision maker for its ``process_group`` argument (validated by
    :func:`resolve_process_group`)."""
    group = resolve_process_group(process_group)
    return LocalDecisions() if group is None else RankConsensus(group)


class RankConsensus(LocalDecisions):
    """Agreement of one Governor with its peers over ``group`` (see the module docstring).

    ``group`` is an initialized ``torch.distributed`` process group; its timeout bounds every
    exchange.
    """

    distributed = True

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.global_ranks = tuple(dist.get_global_rank(group, r) for r in range(self.world_size))
        backend = str(dist.get_backend(group)).lower()
        # NCCL reduces only CUDA tensors; gloo (also in a mixed "cpu:gloo,cuda:nccl" group) takes
        # CPU ones, which spares a host-device copy.
        on_cuda = "nccl" in backend and "gloo" not in backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        self.fault_ranks: tuple[int, ...] = ()
        self.veto_ranks: tuple[int, ...] = ()

    @property
    def global_rank(self) -> int:
        return self.global_ranks[self.rank]

    # -- the one collective --------------------------------------------------------------------
    def exchange(self, code: int, what: str) -> tuple[int, ...]:
        """Every rank's value, rank by rank: ONE ``all_reduce(MAX)`` of an int64 tensor where this
        rank writes ``code`` (>= 0) into its own slot and zero elsewhere.

        Raises :class:`DistributedGovernorError` when the exchange fails or does not complete in
        time (a peer died, hung, or stopped calling the Governor in step)."""
        slots = torch.zeros(self.world_size, dtype=torch.int64)
        slots[self.rank] = code
        slots = slots.to(self.device)
        try:
            dist.all_reduce(slots, op=dist.ReduceOp.MAX, group=self.group)
            return tuple(int(v) for v in slots.tolist())
        except RuntimeError as exc:  # gloo raises when the group's timeout expires or a peer is gone
            raise DistributedGovernorError(
                f"tolaria: rank {self.global_rank} could not agree on {what} with its peers within the "
                f"process group's timeout: a rank died, hung, or stopped calling the Governor in step "
                f"({exc}). The process group is unusable now: tear it down and restart from a checkpoint."
            ) from exc

    def _ranks_where(self, codes: tuple[int, ...], keep: Callable[[int], bool]) -> tuple[int, ...]:
        return tuple(self.global_ranks[r] for r, code in enumerate(codes) if keep(code))

    # -- checks --------------------------------------------------------------------------------
    def decide(
        self,
        watch: Watch,
        observe: Callable[[], Panic | None],
        what: str,
        *,
        names: Callable[[], Sequence[str]] | None = None,
    ) -> Panic | None:
        """Run this rank's check (``observe``, which may update ``watch``), then agree.

        Returns the group's panic, the same reason on every rank, also kept as
        ``watch.pending`` so the rollback reports it; None when every rank is healthy. A rank
        that did not see the group's reason keeps its own evidence (loss, first bad tensor) when
        it panicked for a lesser reason; one that saw nothing rewinds its monitors (module
        docstring), reports a NaN loss and names the first sick tensor of the lowest rank that
        saw the group's reason, looked up in ``names()`` (the checked tensors' names, the same
        list on every rank; called only when a panic needs it). Raises what ``observe`` raised
        on this rank, and :class:`DistributedGovernorError` on the others."""
        before = _MonitorState(watch)
        try:
            local = observe()
        except BaseException:
            self.exchange(CODE_RANK_ERROR, what)
            raise
        listed: Sequence[str] = ()
        if local is None:
            value = CODE_HEALTHY
        else:
            if local.first_bad is not None and names is not None:
                listed = names()
            value = encode_slot(reason_code(local.reason), local.first_bad, listed)
        values = self.exchange(value, what)
        codes = tuple(v & CODE_MASK for v in values)
        top = max(codes)
        if top == CODE_HEALTHY:
            return None
        if local is None:
            before.restore()
        if top == CODE_RANK_ERROR:
            failed = self._ranks_where(codes, lambda c: c == CODE_RANK_ERROR)
            raise DistributedGovernorError(f"tolaria: rank(s) {list(failed)} raised during {what}", failed)
        self.fault_ranks = self._ranks_where(codes, lambda c: c != CODE_HEALTHY)
        reason = reason_of(top)
        assert reason is not None
        if local is None:
            detector = watch.grad_norms if reason == REASON_GRAD_EXPLOSION else watch.loss.spikes
            local = Panic(reason=reason, loss=math.nan, threshold=detector.threshold(),
                          consecutive=detector.consecutive,
                          first_bad=self._peer_first_bad(values, top, names))  # fmt: skip
        return watch.keep(dataclasses.replace(local, reason=reason))

    @staticmethod
    def _peer_first_bad(
        values: tuple[int, ...], top: int, names: Callable[[], Sequence[str]] | None
    ) -> str | None:
        """The first sick tensor of the lowest rank whose slot holds the group's reason ``top``."""
        if names is None or not any(v >> CODE_BITS for v in values):
            return None
        listed = names()
        for value in values:
            code, name = decode_slot(value, listed)
            if code == top and name is not None:
                return name
        return None

    # -- snapshots -----------------------------------------------------------------------------
    def agree_on_commit(self, healthy: bool) -> bool:
        """Whether every rank's capture is healthy (one exchange); the vetoing ranks are kept
        in :attr:`veto_ranks`. A rank whose capture raised votes False, so its peers do not wait."""
        codes = self.exchange(0 if healthy else 1, "a snapshot commit")
        self.veto_ranks = self._ranks_where(codes, lambda c: c != 0)
        return not self.veto_ranks

    # -- rollbacks -----------------------------------------------------------------------------
    def run_rollback(self, rollback: Callable[[], _T]) -> _T:
        """Run this rank's ``rollback``, then exchange success/failure with the group (one
        exchange). Returns its result when every rank succeeded. Otherwise the failed rank
        re-raises its own error and every other rank raises :class:`DistributedGovernorError`
        naming the failed ranks (its own rollback succeeded; the replicas may now differ)."""
        try:
            result = rollback()
        except BaseException:
            failed = self._ranks_where(self.exchange(1, "a rollback"), lambda c: c != 0)
            logger.error("tolaria: the rollback failed on rank(s) %s of the process group", list(failed))
            raise
        failed = self._ranks_where(self.exchange(0, "a rollback"), lambda c: c != 0)
        if failed:
            raise DistributedGovernorError(
                f"tolaria: the rollback failed on rank(s) {list(failed)}; rank {self.global_rank} "
                "restored its own LKG, so the replicas may now differ. Every LKG is intact: fix the "
                "cause and call execute_rollback() again on every rank, or restart from a checkpoint",
                failed,
            )
        self.fault_ranks = ()
        return result

    # -- telemetry -----------------------------------------------------------------------------
    def ranked(self, payload: _P, fault_ranks: tuple[int, ...]) -> _P:
        """``payload`` (a Governor panic/rollback/snapshot payload) with this rank, the group's
        size and ``fault_ranks`` added; other payloads unchanged."""
        ranked_type = _RANKED.get(type(payload))
        if ranked_type is None:
            return payload
        values = {f.name: getattr(payload, f.name) for f in dataclasses.fields(payload)}  # type: ignore[arg-type]
        return ranked_type(  # type: ignore[no-any-return]
            **values, rank=self.global_rank, world_size=self.world_size, fault_ranks=fault_ranks
        )


__all__ = [
    "CODE_HEALTHY",
    "CODE_RANK_ERROR",
    "REASON_PRIORITY",
    "DistributedGovernorError",
    "LocalDecisions",
    "RankConsensus",
    "RankedPanicPayload",
    "RankedRollbackPayload",
    "RankedSnapshotPayload",
    "decode_slot",
    "encode_slot",
    "reason_code",
    "make_decisions",
    "reason_of",
    "resolve_process_group",
]
