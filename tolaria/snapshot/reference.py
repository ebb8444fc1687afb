"""The pure-PyTorch snapshot store: the CPU path, the fallback, and the native engine's oracle.

Memory layout: one flat 1-D buffer per dtype, each key a shaped view at a fixed offset. The
layout is planned from the *structure* of the tensor set — keys, shapes, dtypes, and which keys
share memory — and reused for every capture with the same structure, so a steady-state snapshot
allocates nothing. Tensors that share memory (tied weights) are stored once.

Two buffer sets exist once the store is warm: the committed LKG and a spare that the next
capture writes into (double buffering). A commit swaps them, which is why a ``last_good_state``
dict stays valid until the commit after the one that produced it.

On CUDA the buffers are pinned, the device→host copies are ``non_blocking`` on the caller's
current stream (so they are ordered after the work already queued there, BatchNorm statistics
included), and one event per device marks their end: ``resolve()`` waits on it once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tolaria.health import BACKENDS as HEALTH_BACKENDS
from tolaria.health import HealthReport, check_tensors, host_backend
from tolaria.snapshot.store import (
    BufferedStore,
    CaptureTicket,
    NamedTensors,
    Resolution,
    RestoreResult,
    check_restore_targets,
    normalize_named_tensors,
)
from tolaria.snapshot.ties import storage_groups

logger = logging.getLogger(__name__)

# (key, shape, dtype, device type, index of the storage group it belongs to)
_Signature = tuple[tuple[str, tuple[int, ...], torch.dtype, str, int], ...]


def _structure(items: Sequence[tuple[str, torch.Tensor]]) -> tuple[_Signature, list[int]]:
    """The layout-relevant structure of a tensor set, and for each key its storage group
    (:func:`tolaria.snapshot.ties.storage_groups`; each empty tensor gets a group of its own)."""
    group_of, group_first = storage_groups([tensor for _, tensor in items])
    next_group = len(group_first)
    for index, group in enumerate(group_of):
        if group < 0:
            group_of[index], next_group = next_group, next_group + 1
    signature = tuple(
        (key, tuple(tensor.shape), tensor.dtype, tensor.device.type, group)
        for (key, tensor), group in zip(items, group_of, strict=True)
    )
    return signature, group_of


def _pinned_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory, so device→host copies can be asynchronous. Raises RuntimeError
    when it cannot be had (no accelerator, or the pinned pool is exhausted)."""
    return torch.empty(numel, dtype=dtype, pin_memory=True)


@dataclass
class _BufferSet:
    """One copy of the whole tensor set: flat buffers per dtype and the views into them."""

    signature: _Signature
    keys: tuple[str, ...]
    group_of: list[int]
    flats: dict[torch.dtype, torch.Tensor]
    group_views: list[torch.Tensor]
    nbytes: int
    pinned: bool
    meta: object = None
    key_views: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def allocate(
        cls, signature: _Signature, group_of: list[int], items: Sequence[tuple[str, torch.Tensor]], pin: bool
    ) -> tuple[_BufferSet, str | None]:
        """Plan offsets and allocate; returns the set and, if pinning failed, the reason."""
        first_of_group: dict[int, torch.Tensor] = {}
        for (_, tensor), group in zip(items, group_of, strict=True):
            first_of_group.setdefault(group, tensor)
        sizes: dict[torch.dtype, int] = {}
        placements: list[tuple[torch.dtype, int, int, tuple[int, ...]]] = []
        for group in range(len(first_of_group)):
            tensor = first_of_group[group]
            offset = sizes.get(tensor.dtype, 0)
            placements.append((tensor.dtype, offset, tensor.numel(), tuple(tensor.shape)))
            sizes[tensor.dtype] = offset + tensor.numel()
        flats: dict[torch.dtype, torch.Tensor] = {}
        failure: str | None = None
        for dtype, numel in sizes.items():
            if pin and failure is None:
                try:
                    flats[dtype] = _pinned_empty(numel, dtype)
                    continue
                except RuntimeError as exc:  # no pinnable memory left, or no accelerator at all
                    failure = str(exc)
            flats[dtype] = torch.empty(numel, dtype=dtype)
        group_views = [flats[d][o : o + n].view(shape) for d, o, n, shape in placements]
        nbytes = sum(v.numel() * v.element_size() for v in group_views)
        keys = tuple(key for key, _ in items)
        key_views = {key: group_views[g] for key, g in zip(keys, group_of, strict=True)}
        pinned = pin and failure is None
        return cls(
            signature, keys, list(group_of), flats, group_views, nbytes, pinned, None, key_views
        ), failure


@dataclass
class _Pending:
    buffers: _BufferSet
    events: list[torch.cuda.Event]


class ReferenceSnapshotStore(BufferedStore):
    """Pure-PyTorch :class:`SnapshotStore`.

    Args:
        health_backend: passed to :func:`tolaria.health.check_tensors` to verify captures; the
            copies on the host get :func:`tolaria.health.host_backend` of it.
        pin_memory: pin the host buffers; None (default) pins when any captured tensor is on
            CUDA. If pinning fails the store keeps working with pageable memory (slower, the
            copies become synchronous) and emits one ``SNAPSHOT_DEGRADED`` event.
    """

    backend = "reference"

    def __init__(self, *, health_backend: str = "auto", pin_memory: bool | None = None) -> None:
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be True, False or None, got {type(pin_memory).__name__}")
        if health_backend not in HEALTH_BACKENDS:
            raise ValueError(f"health_backend must be one of {HEALTH_BACKENDS}, got {health_backend!r}")
        self.health_backend = health_backend
        self.pin_memory = pin_memory
        super().__init__()
        self._lkg: _BufferSet | None
        self._spare: _BufferSet | None
        self._pending: _Pending | None

    # -- capture -----------------------------------------------------------------------------
    def capture(self, named_tensors: NamedTensors, *, meta: object = None) -> CaptureTicket:
        items = normalize_named_tensors(named_tensors)
        if self._pending is not None:
            self.resolve()
        signature, group_of = _structure(items)
        on_cuda = any(t.is_cuda for _, t in items)
        staging, rebuilt = self._spare, False
        if staging is None or staging.signature != signature:
            pin = on_cuda if self.pin_memory is None else self.pin_memory
            staging, failure = _BufferSet.allocate(signature, group_of, items, pin)
            rebuilt = True
            if failure is not None:
                self._report_degraded(failure)
        self._spare = None
        staging.meta = meta
        copied: set[int] = set()
        with torch.no_grad():
            for (_, tensor), group in zip(items, group_of, strict=True):
                if group in copied:
                    continue  # tied: the group's view already holds these bytes
                copied.add(group)
                staging.group_views[group].copy_(
                    tensor.detach(), non_blocking=staging.pinned and tensor.is_cuda
                )
        events = []
        for device in sorted({t.device for _, t in items if t.is_cuda}, key=str):
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        self._pending = _Pending(staging, events)
        return CaptureTicket(staging.keys, staging.nbytes, in_flight=bool(events), rebuilt=rebuilt)

    # -- verify and commit ---------------------------------------------------------------------
    def _verify(self, buffers: _BufferSet) -> tuple[HealthReport | None, str | None]:
        """Check the staged bytes: one tensor per float dtype first (cheap), and per key only when
        something is sick, to name the first bad key in capture order."""
        groups = []
        for dtype, flat in buffers.flats.items():
            if flat.is_floating_point():
                groups.append((f"<{dtype}>", flat))
            elif flat.is_complex():
                groups.append((f"<{dtype}>", torch.view_as_real(flat)))
        if not groups:
            return None, None
        backend = host_backend(self.health_backend)  # the copies live on the host
        report = check_tensors(groups, backend=backend)
        if report.healthy:
            return report, None
        per_key = []
        for key in buffers.keys:
            view = buffers.key_views[key]
            if view.is_complex():
                per_key.append((key, torch.view_as_real(view)))
            elif view.is_floating_point():
                per_key.append((key, view))
        detail = check_tensors(per_key, backend=backend)
        return detail, detail.first_bad

    def resolve(self) -> Resolution | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        for event in pending.events:
            event.synchronize()
        buffers = pending.buffers
        report, first_bad = self._verify(buffers)
        committed = report is None or report.healthy
        if committed:
            # The old LKG becomes the spare: the next capture reuses its memory if the layout fits.
            self._spare, self._lkg = self._lkg, buffers
            self._lkg_dict = None
        else:
            buffers.meta = None
            self._spare = buffers
        self._last_resolution = Resolution(committed, buffers.keys, buffers.nbytes, report, first_bad)
        return self._last_resolution

    def _discard_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        for event in pending.events:
            event.synchronize()  # the copy still reads the live tensors we are about to overwrite
        pending.buffers.meta = None
        self._spare = pending.buffers

    # -- restore -------------------------------------------------------------------------------
    def restore(self, targets: NamedTensors) -> RestoreResult:
        items = normalize_named_tensors(targets, argument="targets")
        lkg = self._lkg
        if lkg is None:
            raise RuntimeError("no committed Last Known Good snapshot to restore")
        saved = lkg.key_views
        check_restore_targets(saved, items)
        self._discard_pending()
        cuda_devices = {t.device for _, t in items if t.is_cuda and t.numel()}
        for device in cuda_devices:
            torch.cuda.synchronize(device)  # nothing queued may still read or write the weights
        restored = []
        for key, live in items:
            kept = saved.get(key)
            if kept is None:
                continue
            live.data.copy_(kept, non_blocking=lkg.pinned and live.is_cuda)
            restored.append(key)
        for device in cuda_devices:
            torch.cuda.synchronize(device)
        target_keys = {key for key, _ in items}
        return RestoreResult(
            restored_keys=tuple(restored),
            missing_keys=tuple(key for key, _ in items if key not in saved),
            unexpected_keys=tuple(key for key in lkg.keys if key not in target_keys),
        )

    # -- inspection ----------------------------------------------------------------------------
    def _lkg_views(self) -> dict[str, torch.Tensor]:
        assert self._lkg is not None  # the base class asks only when there is an LKG
        return dict(self._lkg.key_views)

    @property
    def keys(self) -> tuple[str, ...]:
        return () if self._lkg is None else self._lkg.keys

    def make_stream_wait(self, stream: torch.cuda.Stream | None = None) -> None:
        pending = self._pending
        if pending is None or not pending.events:
            return
        target = stream if stream is not None else torch.cuda.current_stream()
        for event in pending.events:
            target.wait_event(event)

    def close(self) -> None:
        self._discard_pending()
        self._lkg = self._spare = None
        self._lkg_dict = None


__all__ = ["ReferenceSnapshotStore"]
