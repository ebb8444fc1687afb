"""What the reference and native stores share: one committed buffer, one spare, one capture.

Both stores keep the same four pieces of state, and the two-phase commit used for rank
consensus (:meth:`BufferedStore.resolve_agreed`) works on exactly those pieces:

* ``_lkg`` — the committed buffer (the Last Known Good), with its ``meta``;
* ``_spare`` — a buffer to reuse for the next capture (the previous LKG after a commit);
* ``_pending`` — the capture staged and not yet resolved (at most one);
* ``_lkg_dict`` — the ``last_good_state`` dict of the current LKG, built on first read.

A subclass supplies the buffers, ``capture``/``resolve``/``restore``/``keys`` and
:meth:`_lkg_views`; the inspection properties, the degraded-memory report and the agreed
commit live here once.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from typing import Any

import torch

from tolaria import telemetry
from tolaria.snapshot.store import Resolution, SnapshotStore

logger = logging.getLogger(__name__)


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
        telemetry.emit_event(
            telemetry.TelemetryEventType.SNAPSHOT_DEGRADED,
            telemetry.Severity.WARNING,
            f"{self.backend} snapshot memory is pageable: pinning failed",
            telemetry.SnapshotDegradedPayload(backend=self.backend, mode="pageable", reason=reason),
            hub=self.hub_source() if self.hub_source is not None else None,
        )

    # -- two-phase resolve: verify, agree, then commit or take back ----------------------------
    def resolve_agreed(self, agree: Callable[[bool], bool]) -> Resolution | None:
        """Verify and commit with :meth:`resolve`, then take the commit back if ``agree`` refuses
        it (see :meth:`SnapshotStore.resolve_agreed` for the contract)."""
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
