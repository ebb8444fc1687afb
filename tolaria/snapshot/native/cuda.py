"""The CUDA half of the native snapshot store: side streams, events and the capture sequence.

See :mod:`tolaria.snapshot.native.store` for the ordering argument; this module only carries it out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from tolaria.backends import triton_health
from tolaria.health import HealthHandle, check_tensors
from tolaria.snapshot.native.layout import ArenaPlan, HostBuffer

logger = logging.getLogger(__name__)

# One fused launch per dtype for many small buffers; a plain loop where torch lacks it.
_copy_all = getattr(torch, "_foreach_copy_", None)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@dataclass(frozen=True)
class CaptureEvents:
    """A capture's two milestones on the side stream (``tolaria._C.CudaEvent``s).

    ``released``: every read of memory the caller may write again (the live parameters) is
    done: their device→host copies and their health check. The optimizer step waits on this.
    ``done``: everything, including the copies out of the store's private device scratch.
    """

    released: Any
    done: Any


class CudaEngine:
    """Per-device side streams and ready/released/done events (``tolaria._C.CudaEvent``),
    created once."""

    def __init__(self, native: ModuleType) -> None:
        self._native = native
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._events: dict[int, tuple[Any, Any, Any]] = {}
        self._judged_backends: set[str] = set()

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device_index(device)
        stream = self._streams.get(index)
        if stream is None:
            # torch creates streams non-blocking: they never serialize with the legacy default
            # stream the training loop usually runs on, so the copies overlap its kernels.
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream

    def _events_of(self, index: int) -> tuple[Any, Any, Any]:
        events = self._events.get(index)
        if events is None:
            event = self._native.CudaEvent
            events = self._events[index] = (event(index), event(index), event(index))
        return events

    def capture(
        self, plan: ArenaPlan, staging: HostBuffer, tensors: tuple[torch.Tensor, ...], health_backend: str
    ) -> tuple[HealthHandle, CaptureEvents]:
        """Enqueue the capture of ``tensors`` into ``staging``; returns its health handle and
        events.

        Call under ``torch.no_grad()``. Returns once everything is enqueued: the host waits only
        for ``foreign`` slots (other devices), which are copied synchronously.

        Side-stream order: the parameters' copies, the health check (parameters and scratch),
        *released*, the scratch's copies, *done*. The scratch (buffers, optimizer state) is the
        store's own memory, so its copies may run on while the next optimizer step writes the
        live tensors: that step waits only for *released*, which with AdamW comes after a third
        of the bytes (parameters, not the two moment buffers).
        """
        device = plan.device
        index = device_index(device)
        caller = torch.cuda.current_stream(device)
        side = self.side_stream(device)
        ready, released, done = self._events_of(index)
        checks: list[tuple[str, torch.Tensor]] = []
        scratch = None
        if plan.ordered:
            scratch = plan.scratch()
            sources = [tensors[plan.slot_key[slot]] for slot in plan.ordered]
            # On the caller's stream, before `ready`: the values as of the work queued so far.
            if _copy_all is not None:
                _copy_all(scratch.views, sources)
            else:
                for view, source in zip(scratch.views, sources, strict=True):
                    view.copy_(source)
            checks += scratch.checks
        for slot in plan.foreign:
            staging.slot_views[slot].copy_(tensors[plan.slot_key[slot]])
        ready.record(caller.cuda_stream)
        ready.block_stream(side.cuda_stream)
        copier = staging.copier
        if copier is not None and plan.direct:  # an empty slot list would mean "every slot"
            copier.capture_device(plan.direct_addresses(tensors), side.cuda_stream, index, plan.direct)
        for key_index, is_complex in plan.direct_checks:
            tensor = tensors[key_index]
            checks.append((plan.keys[key_index], torch.view_as_real(tensor) if is_complex else tensor))
        if checks:
            self._warn_if_synchronous(health_backend)
        with torch.cuda.stream(side):
            health = check_tensors(checks, backend=health_backend, blocking=False)
        released.record(side.cuda_stream)
        if copier is not None and scratch is not None:
            copier.capture_device(scratch.addresses, side.cuda_stream, index, plan.ordered)
        done.record(side.cuda_stream)
        return health, CaptureEvents(released, done)

    def _warn_if_synchronous(self, health_backend: str) -> None:
        """Once per backend: without Triton the check of the device tensors is the reference,
        which reads its result on the host, so capture() waits for the side stream up to that
        check. Judged on the first capture only: later captures pay nothing."""
        if health_backend in self._judged_backends:
            return
        self._judged_backends.add(health_backend)
        if health_backend == "triton" or (health_backend == "auto" and triton_health() is not None):
            return
        logger.warning(
            "snapshot capture on CUDA waits for the parameters' device-to-host copy: its health check "
            "uses the pure-PyTorch reference (health_backend=%r%s), which reads its result on the host. "
            "Install Triton (pip install 'tolaria[triton]') for a capture that returns at once.",
            health_backend,
            "" if health_backend == "reference" else ", Triton unavailable",
        )

    def restore(self, lkg: HostBuffer, addresses: Sequence[int], slots: list[int]) -> None:
        """Device sync, batched host→device copies on the side stream, side-stream sync."""
        assert lkg.copier is not None
        device = lkg.plan.device
        lkg.copier.restore_device(
            addresses, self.side_stream(device).cuda_stream, device_index(device), slots
        )

    def drain(self, device: torch.device) -> None:
        """Wait for whatever a failed capture left on the side stream; never raises."""
        try:
            self.side_stream(device).synchronize()
        except RuntimeError as exc:  # the device is already failing; the caller's error wins
            logger.debug("side stream synchronize after a failed capture: %s", exc)


__all__ = ["CaptureEvents", "CudaEngine", "device_index"]
