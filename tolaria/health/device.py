"""Every CUDA call a device health check makes, behind one object.

:class:`DeviceRuntime` is what a :class:`tolaria.health.plan.TritonPlan` uses for streams,
events, pinned result buffers and CUDA-graph capture; the CPU tests of the device path pass a
fake with the same methods (``tests/test_health_device_path.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class DeviceRuntime:
    """Every CUDA call of a device check, in one place, so CPU tests can drive it with a fake."""

    def __init__(self) -> None:
        # What Triton itself uses: the current stream as an int, without building a Stream.
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self.raw_stream: Callable[[int], int] = raw or (lambda i: torch.cuda.current_stream(i).cuda_stream)
        self.capture_streams: dict[tuple[int, int], torch.cuda.Stream] = {}

    current_device = staticmethod(torch.cuda.current_device)
    device = staticmethod(torch.cuda.device)
    current_stream = staticmethod(torch.cuda.current_stream)

    def event(self) -> Any:
        return torch.cuda.Event()

    def run_kernels(self, launch: Callable[[], None]) -> None:
        """Enqueue a check's kernels (``launch`` does it); a fake that measures only the host side
        of a check (``tolaria.bench.fake_device``) skips them."""
        launch()

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _capture_stream(self, device: torch.device, caller: torch.cuda.Stream) -> torch.cuda.Stream:
        """The stream that captures for ``caller`` (capture needs a stream other than the legacy
        one): one per calling stream, created once. torch hands streams out round-robin from a
        small pool per priority, so a new one per capture would sooner or later be the snapshot
        engine's side stream; and one shared by all callers would chain them (each capture
        waits on its caller and its caller on it), making the training stream wait for a
        snapshot's copies. The high-priority pool keeps these apart from default-priority
        streams; nothing but the captures' stream dependencies ever runs on them."""
        key = (caller.device_index, caller.cuda_stream)
        stream = self.capture_streams.get(key)
        if stream is None:
            stream = self.capture_streams[key] = torch.cuda.Stream(device=device, priority=-1)
        return stream

    def capture(self, device: torch.device, enqueue: Callable[[], None]) -> Any:
        """Record what ``enqueue`` launches as a CUDA graph; executes nothing."""
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        side = self._capture_stream(device, current)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    enqueue()
                finally:
                    graph.capture_end()
        finally:
            current.wait_stream(side)
        return graph


__all__ = ["DeviceRuntime"]
