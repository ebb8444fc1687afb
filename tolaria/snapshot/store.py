"""The snapshot store interface: capture → verify → commit, and restore from the committed LKG.

A store keeps two things: the *committed* Last Known Good (LKG), which only ever holds values a
health check found finite, and at most one *staged* capture. The life of a capture:

1. :meth:`SnapshotStore.capture` copies ``(key, tensor)`` pairs into a staging buffer. On CPU it
   returns when the copy is done; on CUDA it may return while the device→host copy is still
   running (``CaptureTicket.in_flight``).
2. :meth:`SnapshotStore.resolve` waits for that copy, checks exactly the captured values for
   NaN/Inf with :mod:`tolaria.health`, and then commits the staging buffer as the new LKG or
   discards it. A capture is never half-committed: the LKG changes in one step or not at all.
3. :meth:`SnapshotStore.restore` writes the committed LKG back into live tensors, bit-exact and
   in place (``tensor.data.copy_``), so ``nn.Parameter`` objects keep their identity and
   optimizers keep pointing at them.

The store owns the bytes; whether a capture becomes the LKG is decided in :mod:`tolaria.commit`.
The reference store (:mod:`tolaria.snapshot.reference`) is the pure-PyTorch implementation and
the oracle for the native engine (:mod:`tolaria.snapshot.native`). Both derive from
:class:`BufferedStore`, the double-buffer base below.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tolaria.health.report import HealthReport
from tolaria.snapshot.kinds import refusal
from tolaria.telemetry import hub as telemetry_hub
from tolaria.telemetry.payloads import Severity, SnapshotDegradedPayload, TelemetryEventType

if TYPE_CHECKING:
    from tolaria.telemetry.hub import TelemetryHub

logger = logging.getLogger(__name__)

NamedTensors = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


class SnapshotMismatchError(RuntimeError):
    """A restore target does not match its saved value (shape or dtype). Raised before anything
    is written, so the live model and the LKG are both untouched."""


@dataclass(frozen=True)
class CaptureTicket:
    """What :meth:`SnapshotStore.capture` staged.

    ``nbytes`` counts tensors that share memory (tied weights) once. ``in_flight`` is True when
    the copy may still be running (call :meth:`SnapshotStore.resolve` before trusting it).
    ``rebuilt`` is True when the staging layout had to be (re)allocated for this tensor set.
    """

    keys: tuple[str, ...]
    nbytes: int
    in_flight: bool
    rebuilt: bool


@dataclass(frozen=True)
class Resolution:
    """The outcome of :meth:`SnapshotStore.resolve` for one capture.

    ``report`` is the health report of the captured values (per storage group when healthy, per
    key when not); ``first_bad`` is the first sick key in capture order, or None. ``vetoed`` is
    True when this capture was healthy but :meth:`SnapshotStore.resolve_agreed` was told not to
    commit it (another rank's capture was sick).
    """

    committed: bool
    keys: tuple[str, ...]
    nbytes: int
    report: HealthReport | None
    first_bad: str | None
    vetoed: bool = False


@dataclass(frozen=True)
class RestoreResult:
    """What :meth:`SnapshotStore.restore` wrote. ``missing_keys``: targets with no saved value
    (left untouched); ``unexpected_keys``: saved values with no target. Both in a stable order."""

    restored_keys: tuple[str, ...]
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


def normalize_named_tensors(
    named: NamedTensors, *, argument: str = "named_tensors"
) -> list[tuple[str, torch.Tensor]]:
    """Turn a mapping or an iterable of pairs into a list of ``(key, tensor)``.

    Raises TypeError for a non-string key or a non-tensor value, and ValueError for a duplicate
    key or a tensor :func:`tolaria.snapshot.kinds.refusal` refuses (a DTensor, meta, lazy,
    quantized, sparse, a dispatch subclass); every message names ``argument`` and the key.
    """
    items = list(named.items()) if isinstance(named, Mapping) else list(named)
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(f"{argument} must hold (key, tensor) pairs, got {type(item).__name__}")
        key, tensor = item
        if not isinstance(key, str):
            raise TypeError(f"{argument}: keys must be str, got {type(key).__name__}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{argument}[{key!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        reason = refusal(tensor)
        if reason is not None:
            raise ValueError(f"cannot snapshot {argument}[{key!r}]: it {reason}")
        if key in seen:
            raise ValueError(f"{argument}: duplicate key {key!r}")
        seen.add(key)
    return items


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's bytes in memory order, for a checksum of exactly what is stored (b"" when
    it is empty)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return data.numpy().tobytes() if data.numel() else b""


def check_restore_targets(saved: Mapping[str, torch.Tensor], targets: list[tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`SnapshotMismatchError` listing every target whose shape or dtype differs from
    its saved value (a bit-exact restore needs both to match). Writes nothing."""
    problems = []
    for key, live in targets:
        kept = saved.get(key)
        if kept is None:
            continue
        if tuple(live.shape) != tuple(kept.shape) or live.dtype != kept.dtype:
            problems.append(
                f"{key}: live {tuple(live.shape)} {live.dtype} vs saved {tuple(kept.shape)} {kept.dtype}"
            )
    if problems:
        raise SnapshotMismatchError("cannot restore, saved values do not fit: " + "; ".join(problems))


class SnapshotStore(abc.ABC):
    """Keeps the Last Known Good state: a committed, verified copy of a set of named tensors.

    Threading: a store is used from one thread (the training loop). Implementations:
    :class:`tolaria.snapshot.reference.ReferenceSnapshotStore` (pure PyTorch) and the native
    engine. ``backend`` names the implementation (``"reference"``, ``"native"``).
    """

    backend: ClassVar[str] = "abstract"
    # Where the store's own telemetry (SNAPSHOT_DEGRADED) goes: None means
    # ``telemetry.get_hub()`` at emit time. The Governor sets its own hub lookup here, so that
    # patching ``tolaria.governor.get_hub`` catches every event of a governed run.
    hub_source: Callable[[], TelemetryHub] | None = None

    @abc.abstractmethod
    def capture(self, named_tensors: NamedTensors, *, meta: object = None) -> CaptureTicket:
        """Stage a copy of ``named_tensors`` (values are read, never written).

        A capture still pending from before is resolved first (its :class:`Resolution` is then
        available as :attr:`last_resolution`). On CPU the copy is complete on return. On CUDA
        the copy is ordered after the work already queued on the current stream and may still
        be running on return; it must finish before anything writes these tensors again, which
        :meth:`make_stream_wait` arranges without a host sync. ``meta`` is an opaque object
        committed or discarded together with the tensors (see :attr:`lkg_meta`).

        Raises TypeError/ValueError for malformed input (see :func:`normalize_named_tensors`);
        on any error the committed LKG is untouched.
        """

    @abc.abstractmethod
    def resolve(self) -> Resolution | None:
        """Finish the pending capture: wait for its copy (blocking), check exactly the captured
        values for NaN/Inf, then commit them as the LKG or discard them. Returns None when no
        capture is pending. Never raises for a sick capture: that is ``committed=False``."""

    @abc.abstractmethod
    def resolve_agreed(self, agree: Callable[[bool], bool]) -> Resolution | None:
        """:meth:`resolve`, committing only if ``agree(healthy)`` allows it (the rank vote);
        see :meth:`BufferedStore.resolve_agreed` for the full contract."""

    @abc.abstractmethod
    def restore(self, targets: NamedTensors) -> RestoreResult:
        """Write the committed LKG into the live ``targets`` (matched by key), in place and
        bit-exact; tensors that shared memory at capture time all receive the shared value.

        A capture still staged is waited for and *discarded*, not committed: restoring means the
        present state is suspect, so the previous LKG is what comes back. On CUDA the device is
        synchronized before the first write and after the last, so the weights are in place when
        this returns. Blocking.

        Raises RuntimeError when there is no committed LKG, :class:`SnapshotMismatchError` when a
        target's shape or dtype differs from its saved value; in both cases nothing is written and
        the LKG stays committed. Never modifies the LKG.
        """

    @property
    @abc.abstractmethod
    def last_good_state(self) -> dict[str, torch.Tensor] | None:
        """The committed LKG as ``key → CPU tensor`` (no grad; pinned when captured from CUDA),
        or None when nothing was ever committed. Resolves a pending capture first.

        The tensors are views over the committed buffer, not copies: read-only by contract, and
        valid at least until the next commit. A new dict object is returned for each commit;
        reading twice between commits returns the same object.
        """

    @property
    @abc.abstractmethod
    def lkg_meta(self) -> object:
        """The ``meta`` passed to the capture that became the LKG (None if none). Resolves first."""

    @property
    @abc.abstractmethod
    def has_lkg(self) -> bool:
        """Whether a committed LKG exists. Does not resolve a pending capture."""

    @property
    @abc.abstractmethod
    def keys(self) -> tuple[str, ...]:
        """Keys of the committed LKG in capture order (empty without one). Does not resolve."""

    @property
    @abc.abstractmethod
    def in_flight(self) -> bool:
        """Whether a capture is staged and not yet resolved."""

    @property
    @abc.abstractmethod
    def last_resolution(self) -> Resolution | None:
        """The most recent :class:`Resolution`, however it was triggered."""

    @abc.abstractmethod
    def make_stream_wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current CUDA stream) wait on the GPU, without blocking the
        host, until the pending capture's copy has finished reading the live tensors. A no-op on
        CPU or when nothing is in flight. The Governor calls it from an optimizer step pre-hook
        so the next update cannot overwrite parameters under an in-flight copy."""

    def close(self) -> None:
        """Release buffers (optional); the store must not be used afterwards."""
        return None


# -- the double-buffer base of both stores -------------------------------------------------
# Both stores keep the same four pieces of state, and the agreed commit works on exactly those:
# ``_lkg`` (the committed buffer, with its ``meta``), ``_spare`` (a buffer the next capture
# reuses: the previous LKG after a commit), ``_pending`` (the capture staged and not yet
# resolved, at most one) and ``_lkg_dict`` (the ``last_good_state`` dict of the current LKG,
# built on first read). A subclass supplies the buffers, ``capture``/``resolve``/``restore``/
# ``keys`` and :meth:`BufferedStore._lkg_views`.


class BufferedStore(SnapshotStore):
    """Base of the stores that commit by swapping a staging buffer in as the LKG."""

    def __init__(self) -> None:
        self._lkg: Any = None
        self._spare: Any = None
        self._pending: Any = None
        self._lkg_dict: dict[str, torch.Tensor] | None = None
        self._last_resolution: Resolution | None = None
        self._reported_degraded = False

    @abc.abstractmethod
    def _lkg_views(self) -> dict[str, torch.Tensor]:
        """``key -> view`` over the committed buffer (``self._lkg`` is not None here)."""

    # -- inspection ----------------------------------------------------------------------------
    @property
    def last_good_state(self) -> dict[str, torch.Tensor] | None:
        if self._pending is not None:
            self.resolve()
        if self._lkg is None:
            return None
        if self._lkg_dict is None:
            self._lkg_dict = self._lkg_views()
        return self._lkg_dict

    @property
    def lkg_meta(self) -> object:
        if self._pending is not None:
            self.resolve()
        return None if self._lkg is None else self._lkg.meta

    @property
    def has_lkg(self) -> bool:
        return self._lkg is not None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    @property
    def last_resolution(self) -> Resolution | None:
        return self._last_resolution

    @property
    def pinned(self) -> bool:
        """Whether the committed LKG lives in pinned memory."""
        return self._lkg is not None and bool(self._lkg.pinned)

    def _report_degraded(self, reason: str) -> None:
        """Pinning failed and pageable memory is used: log every time, emit telemetry once."""
        logger.warning("%s snapshot memory could not be pinned, using pageable: %s", self.backend, reason)
        if self._reported_degraded:
            return
        self._reported_degraded = True
        telemetry_hub.emit_event(
            TelemetryEventType.SNAPSHOT_DEGRADED,
            Severity.WARNING,
            f"{self.backend} snapshot memory is pageable: pinning failed",
            SnapshotDegradedPayload(backend=self.backend, mode="pageable", reason=reason),
            hub=self.hub_source() if self.hub_source is not None else None,
        )

    # -- two-phase resolve: verify, agree, then commit or take back ----------------------------
    def resolve_agreed(self, agree: Callable[[bool], bool]) -> Resolution | None:
        """Like :meth:`resolve`, but the pending capture is committed only if ``agree`` allows it.

        ``agree(healthy)`` receives this store's own verdict on its capture and returns whether it
        may be committed, e.g. whether every rank of a process group found its capture healthy.
        It is called exactly once whenever a capture was pending, also when verification raises
        (with False, before the error propagates), so a collective inside it is entered by every
        rank; it is not called when nothing is pending (the result is then None). A healthy
        capture that ``agree`` rejects is discarded and the previous LKG stays committed
        (``committed=False, vetoed=True``): :meth:`resolve` commits, then the commit is taken
        back by swapping the buffers again.
        """
        if not self.in_flight:
            return None
        previous = self._lkg
        try:
            resolution = self.resolve()
        except BaseException:
            agree(False)
            raise
        if resolution is None:  # pragma: no cover - in_flight promised a pending capture
            agree(False)
            return None
        if agree(resolution.committed) or not resolution.committed:
            return resolution
        return self._revert_commit(previous, resolution)

    def _revert_commit(self, previous: object, resolution: Resolution) -> Resolution:
        """Take back the commit :meth:`resolve` just made: its buffer becomes the spare again (its
        meta dropped, as for a sick capture) and ``previous`` (the committed buffer before it, or
        None) is the LKG again."""
        rejected = self._lkg
        rejected.meta = None
        vetoed = Resolution(False, resolution.keys, resolution.nbytes, resolution.report, None, vetoed=True)
        self._lkg, self._spare, self._lkg_dict, self._last_resolution = previous, rejected, None, vetoed
        return vetoed


def require_default_stream(device: torch.device, caller: str) -> None:
    """Raise RuntimeError (mentioning "non-default CUDA stream") when CUDA is present and the
    current stream of ``device`` (of the current CUDA device for a CPU model) is not its default
    stream: a capture there could not be ordered after the training step's writes."""
    if not torch.cuda.is_available():
        return
    if device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        raise RuntimeError(
            f"{caller} was called inside a non-default CUDA stream; call it on the default stream "
            "so the capture is ordered after the step's writes"
        )


__all__ = [
    "BufferedStore",
    "CaptureTicket",
    "NamedTensors",
    "Resolution",
    "RestoreResult",
    "SnapshotMismatchError",
    "SnapshotStore",
    "check_restore_targets",
    "normalize_named_tensors",
    "require_default_stream",
    "tensor_bytes",
]
