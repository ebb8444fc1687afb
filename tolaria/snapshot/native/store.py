"""The native snapshot store: host arenas filled by ``tolaria._C``, planned by
:mod:`~tolaria.snapshot.native.layout`, with the CUDA sequence in :mod:`~tolaria.snapshot.native.cuda`.

What this store promises beyond :class:`~tolaria.snapshot.store.SnapshotStore`:

* ``double_buffer=False`` halves host memory: the one arena *is* the LKG, so from the start of a
  capture until its commit there is no LKG (a sick or failed capture leaves nothing to roll back
  to; a rollback while a capture is staged raises).
* CPU capture: ``memcpy`` of every contiguous tensor with the GIL released (threads for large
  arenas). From ``FUSED_VERIFY_MIN_BYTES`` up, the same pass sums the squares of what it wrote,
  block by block while the block is in cache (``CopyPlan.capture_host_checked``), so verifying
  the staged bytes costs no second read from memory; a smaller arena is still in cache after the
  copy, and its staging bytes are checked one region per dtype (cheaper than a sum per slot for
  thousands of tiny tensors), as they are with ``health_backend="reference"`` or ``"triton"``.
  The per-key check runs only to name a sick key (or to tell a sum that overflowed from a NaN).
* CUDA capture returns while the copy runs. The checked bytes are the committed bytes: the fused
  check and the device→host copies read the same memory on one side stream, after event *ready*
  (recorded on the caller's stream) and before *done*; nothing writes that memory in between
  because buffers go through the store's private scratch and parameters are written only by the
  optimizer, whose step waits on *released* (:meth:`NativeSnapshotStore.make_stream_wait`,
  installed by the Governor as a step pre-hook). Only ``nn.Parameter`` objects are read directly;
  anything else goes through the scratch. Without Triton the check reads its result on the host,
  so ``capture()`` waits up to it (a warning says so once). Tensors must not be freed or have
  their storage replaced while a capture is in flight.
* Restore: device sync, one batched host→device copy into the live tensors (Parameter objects
  keep their identity), side-stream sync; non-contiguous or moved targets go through ``copy_``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import torch

from tolaria import _ext
from tolaria.health import HealthHandle, HealthReport, check_tensors, host_backend
from tolaria.health.report import build_report
from tolaria.snapshot.native.cuda import CaptureEvents, CudaEngine
from tolaria.snapshot.native.layout import ArenaPlan, HostBuffer, signature_of
from tolaria.snapshot.store import (
    BufferedStore,
    CaptureTicket,
    NamedTensors,
    Resolution,
    RestoreResult,
    check_restore_targets,
    normalize_named_tensors,
)

logger = logging.getLogger(__name__)
_first, _second = itemgetter(0), itemgetter(1)


@dataclass
class _Pending:
    """A staged capture: its buffer, the tensors it reads (kept alive until it is resolved) and,
    on CUDA, its health handle and events."""

    buffer: HostBuffer
    tensors: tuple[torch.Tensor, ...]
    health: HealthHandle | None = None
    events: CaptureEvents | None = None
    sums: list[float] | None = None  # CPU, fused: each direct slot's sum of squares as written

    @property
    def done(self) -> Any:
        """The event after the capture's last copy (a ``tolaria._C.CudaEvent``), None on CPU."""
        return None if self.events is None else self.events.done


class NativeSnapshotStore(BufferedStore):
    """:class:`SnapshotStore` backed by the compiled engine (see the module docstring).

    Args:
        health_backend: passed to :func:`tolaria.health.check_tensors` to verify captures; the
            copies on the host get :func:`tolaria.health.host_backend` of it.
        pin_memory: pin the arenas; None (default) pins when the tensors are on CUDA.
        double_buffer: keep a staging arena beside the LKG (default). False halves host memory,
            but a capture then overwrites the LKG in place (see the module docstring).
        threads: CPU copy threads for large arenas; 0 picks the hardware's count (at most 8).
        chunk_bytes: largest single host allocation; larger arenas are split into chunks.
        alignment: byte alignment of every slot, a power of two >= 256.

    Raises:
        ImportError: the compiled extension is unavailable (the message says why).
        TypeError, ValueError: a malformed argument (named in the message).
    """

    #: CPU arenas of at least this many bytes are verified inside the copy (see the module
    #: docstring): past the size of a core's cache a second read comes from memory.
    FUSED_VERIFY_MIN_BYTES = 4 << 20
    backend = "native"

    def __init__(
        self,
        *,
        health_backend: str = "auto",
        pin_memory: bool | None = None,
        double_buffer: bool = True,
        threads: int = 0,
        chunk_bytes: int = 1 << 30,
        alignment: int = 256,
    ) -> None:
        self._native = _ext.require_extension()
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be True, False or None, got {type(pin_memory).__name__}")
        if not isinstance(double_buffer, bool):
            raise TypeError(f"double_buffer must be True or False, got {type(double_buffer).__name__}")
        limits = (("threads", threads, 0), ("chunk_bytes", chunk_bytes, 1), ("alignment", alignment, 256))
        for name, value, low in limits:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= 256, got {alignment}")
        self.health_backend = health_backend
        self.pin_memory = pin_memory
        self.double_buffer = double_buffer
        self.threads = threads
        self.chunk_bytes = chunk_bytes
        self.alignment = alignment
        self._cuda = CudaEngine(self._native)
        self._plan: ArenaPlan | None = None
        super().__init__()
        self._lkg: HostBuffer | None
        self._spare: HostBuffer | None
        self._pending: _Pending | None

    # -- capture -------------------------------------------------------------------------------
    def capture(self, named_tensors: NamedTensors, *, meta: object = None) -> CaptureTicket:
        keys, tensors = self._read(named_tensors)
        if self._pending is not None:
            self.resolve()
        plan, rebuilt = self._plan, False
        if plan is None or not plan.recognises(keys, tensors) or not plan.ties_hold(tensors):
            signature = self._signature(keys, tensors)
            if plan is None or plan.signature != signature or not plan.ties_hold(tensors):
                items = list(zip(keys, tensors, strict=True))
                normalize_named_tensors(items)  # a new structure is validated in full, once
                plan = self._plan = ArenaPlan(
                    items, signature, self._native, alignment=self.alignment, chunk_bytes=self.chunk_bytes
                )
                rebuilt = True
            plan.remember(tensors)
        staging = self._take_staging(plan)
        staging.meta = meta
        pending = _Pending(staging, tensors)
        try:
            with torch.no_grad():
                if plan.device.type == "cuda":
                    pending.health, pending.events = self._cuda.capture(
                        plan, staging, tensors, self.health_backend
                    )
                else:
                    pending.sums = self._capture_cpu(plan, staging, tensors)
        except BaseException:
            self._abandon(pending)
            raise
        self._pending = pending
        return CaptureTicket(plan.keys, plan.nbytes, in_flight=pending.done is not None, rebuilt=rebuilt)

    @staticmethod
    def _read(named: NamedTensors) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
        """Keys and tensors without a per-item Python loop; malformed input falls through to
        :func:`normalize_named_tensors`, which raises the documented error."""
        items: Any = named
        try:
            if isinstance(named, Mapping):
                return tuple(named), tuple(named.values())
            items = list(named)
            # Not zip(*items, strict=True): unpacking 5,000 pairs into arguments costs ~5 ms.
            if set(map(len, items)) - {2}:
                raise ValueError("not pairs")
            return tuple(map(_first, items)), tuple(map(_second, items))
        except (TypeError, ValueError):
            normalize_named_tensors(items)
            raise

    @staticmethod
    def _signature(keys: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> Any:
        """:func:`signature_of`, turning non-tensor values into the documented error."""
        try:
            return signature_of(keys, tensors)
        except (TypeError, ValueError, AttributeError, RuntimeError):
            normalize_named_tensors(list(zip(keys, tensors, strict=True)))
            raise

    def _take_staging(self, plan: ArenaPlan) -> HostBuffer:
        """The buffer this capture writes: the spare if it fits the plan, else a new one."""
        candidates = [self._spare]
        if not self.double_buffer:
            # One arena only: it is about to be overwritten, so it stops being an LKG now.
            candidates.append(self._lkg)
            self._lkg, self._lkg_dict = None, None
        self._spare = None
        for buffer in candidates:
            if buffer is not None and buffer.plan is plan:
                return buffer
        pin = plan.device.type == "cuda" if self.pin_memory is None else self.pin_memory
        buffer = HostBuffer(plan, self._native, pin=pin)
        if buffer.fallback_reason:
            self._report_degraded(buffer.fallback_reason)
        return buffer

    def _capture_cpu(self, plan: ArenaPlan, staging: HostBuffer, tensors: tuple[torch.Tensor, ...]
                     ) -> list[float] | None:  # fmt: skip
        """Copy into ``staging``; the direct slots' sums of squares when the copy computed them."""
        sums = None
        if plan.direct and staging.copier is not None:
            addresses = plan.direct_addresses(tensors)
            slots = [] if plan.all_direct else plan.direct
            if self.health_backend in ("auto", "native") and plan.nbytes >= self.FUSED_VERIFY_MIN_BYTES:
                sums = staging.copier.capture_host_checked(addresses, plan.direct_codes, self.threads, slots)
            else:
                staging.copier.capture_host(addresses, self.threads, slots)
        for slot in plan.foreign:
            staging.slot_views[slot].copy_(tensors[plan.slot_key[slot]])
        return sums

    def _abandon(self, pending: _Pending) -> None:
        """A capture failed: wait out whatever it enqueued, keep its buffer as the spare."""
        if pending.buffer.plan.device.type == "cuda":
            self._cuda.drain(pending.buffer.plan.device)
        pending.buffer.meta = None
        self._spare = pending.buffer

    # -- verify and commit ---------------------------------------------------------------------
    def resolve(self) -> Resolution | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        buffer = pending.buffer
        try:
            if pending.done is not None:
                pending.done.synchronize()
            report, first_bad, healthy = self._verify(pending)
        except BaseException:
            self._abandon(pending)
            raise
        if healthy:
            if self.double_buffer:
                self._spare = self._lkg
            self._lkg, self._lkg_dict = buffer, None
        else:
            buffer.meta = None
            self._spare = buffer
        plan = buffer.plan
        self._last_resolution = Resolution(healthy, plan.keys, plan.nbytes, report, first_bad)
        return self._last_resolution

    def _verify(self, pending: _Pending) -> tuple[HealthReport | None, str | None, bool]:
        """Health of exactly the captured bytes: on CUDA the side-stream check of the device
        tensors the copies read (plus foreign slots on the host), on CPU the staging regions."""
        buffer, plan = pending.buffer, pending.buffer.plan
        if pending.sums is not None:
            return self._verify_sums(buffer, pending.sums)
        host_checks = buffer.regions
        report: HealthReport | None = None
        if pending.health is not None:
            report = pending.health.result()
            host_checks = buffer.slot_checks(plan.foreign)
        host_report = check_tensors(host_checks, backend=self._host_backend()) if host_checks else None
        healthy = all(r is None or r.healthy for r in (report, host_report))
        if healthy:
            return report or host_report, None, True
        detail = check_tensors(buffer.checkable_key_views(), backend=self._host_backend())
        first_bad = detail.first_bad or (report.first_bad if report is not None else None)
        return detail, first_bad, False

    def _verify_sums(self, buffer: HostBuffer, sums: list[float]) -> tuple[HealthReport, str | None, bool]:
        """The fused CPU capture's verdict: every direct slot's sum finite, and the slots it did
        not sum (copied by torch, or fp8) healthy; otherwise the per-key check decides (a sum
        that overflowed fp32 is not a sick tensor)."""
        plan = buffer.plan
        host_checks = buffer.slot_checks(plan.foreign + plan.unsummed)
        rest = check_tensors(host_checks, backend=self._host_backend()) if host_checks else None
        if all(map(math.isfinite, sums)) and (rest is None or rest.healthy):
            zeros, norms = [0] * len(sums), list(map(math.sqrt, sums))
            report = build_report(plan.direct_names, norms, zeros, zeros, zeros, "native", squares=sums)
            return report, None, True
        detail = check_tensors(buffer.checkable_key_views(), backend=self._host_backend())
        return detail, detail.first_bad, detail.healthy

    def _host_backend(self) -> str:
        # Staging bytes live on the host, where "triton" may not run (see host_backend).
        return host_backend(self.health_backend)

    def _discard_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.done is not None:
            pending.done.synchronize()  # the copy may still read tensors about to be written
        pending.buffer.meta = None
        self._spare = pending.buffer

    # -- restore -------------------------------------------------------------------------------
    def restore(self, targets: NamedTensors) -> RestoreResult:
        if not isinstance(targets, Mapping):
            targets = list(targets)  # read once: both paths below go through it
        lkg = self._lkg
        if lkg is not None:
            result = self._restore_by_routes(lkg, targets)
            if result is not None:
                return result
        items = normalize_named_tensors(targets, argument="targets")
        if lkg is None:
            raise RuntimeError("no committed Last Known Good snapshot to restore")
        saved = lkg.key_views()
        check_restore_targets(saved, items)
        self._discard_pending()
        plan = lkg.plan
        addresses: list[int] = []
        slots: list[int] = []
        fallback: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        restored = []
        for key, live in items:
            key_index = plan.key_index.get(key)
            if key_index is None:
                continue
            restored.append(key)
            slot = plan.key_slot[key_index]
            if slot < 0:
                continue  # empty tensor: nothing to write
            if live.device == plan.device and live.is_contiguous() and not (live.is_conj() or live.is_neg()):
                address = live.data_ptr()
                if address not in seen:  # tied targets: one write
                    seen.add(address)
                    addresses.append(address)
                    slots.append(slot)
            else:  # non-contiguous, a lazy conjugate/negative view, or the model moved
                fallback.append((live, lkg.slot_views[slot]))
        self._write_back(lkg, addresses, slots, fallback)
        target_keys = {key for key, _ in items}
        return RestoreResult(
            restored_keys=tuple(restored),
            missing_keys=tuple(key for key, _ in items if key not in saved),
            unexpected_keys=tuple(key for key in plan.keys if key not in target_keys),
        )

    def _restore_by_routes(self, lkg: HostBuffer, targets: NamedTensors) -> RestoreResult | None:
        """Restore without a per-key walk when the targets are the very objects the LKG's plan
        last captured, unchanged in everything the full path checks (the Governor's rollback;
        see :meth:`ArenaPlan.restore_routes`); None, having written nothing, otherwise."""
        try:
            keys, tensors = self._read(targets)
        except (TypeError, ValueError):
            return None  # malformed: the full path raises the documented error
        plan = lkg.plan
        addresses = plan.restore_routes(keys, tensors)
        if addresses is None:
            return None
        self._discard_pending()
        fallback = [(tensors[plan.slot_key[slot]], lkg.slot_views[slot]) for slot in plan.restore_copied]
        self._write_back(lkg, addresses, plan.restore_direct, fallback)
        return RestoreResult(restored_keys=plan.keys, missing_keys=(), unexpected_keys=())

    def _write_back(
        self,
        lkg: HostBuffer,
        addresses: Sequence[int],
        slots: list[int],
        fallback: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        devices = {live.device for live, _ in fallback if live.is_cuda}
        for device in devices:
            torch.cuda.synchronize(device)
        if addresses and lkg.copier is not None:
            if lkg.plan.device.type == "cuda":
                self._cuda.restore(lkg, addresses, slots)
            else:
                lkg.copier.restore_host(addresses, self.threads, slots)
        with torch.no_grad():
            for live, saved in fallback:
                live.data.copy_(saved)
        for device in devices:
            torch.cuda.synchronize(device)

    # -- inspection ----------------------------------------------------------------------------
    def _lkg_views(self) -> dict[str, torch.Tensor]:
        assert self._lkg is not None  # the base class asks only when there is an LKG
        return dict(self._lkg.key_views())

    @property
    def keys(self) -> tuple[str, ...]:
        return () if self._lkg is None else self._lkg.plan.keys

    def make_stream_wait(self, stream: torch.cuda.Stream | None = None) -> None:
        pending = self._pending
        if pending is None or pending.events is None:
            return
        target = stream if stream is not None else torch.cuda.current_stream(pending.buffer.plan.device)
        # *released*, not *done*: what remains after it reads only the store's own scratch.
        pending.events.released.block_stream(target.cuda_stream)

    def close(self) -> None:
        self._discard_pending()
        self._lkg = self._spare = self._plan = None
        self._lkg_dict = None


__all__ = ["NativeSnapshotStore"]
