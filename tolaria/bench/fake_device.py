"""A fake device for the fused health check: what a check costs the host, with no GPU.

On CUDA, a guarded step's Governor calls spend host time on Python and launches, while the
kernels run on the device. :class:`FakeDevice` stands in for
:class:`tolaria.health.device.DeviceRuntime` for CPU tensors, so the same plans, result slots,
event polls and graph adoption run on a CPU machine with the kernels left out:

- ``run_kernels`` and graph replays enqueue nothing (a plan's result buffer starts zeroed, so
  every check reads as healthy);
- events have always completed, so a deferred verdict is judged at its first poll, as on a GPU
  that keeps up;
- streams and devices are no-ops, and result slots are ordinary host tensors.

What it does not see: the CUDA driver's own launch cost (a few µs per launch, replaced here by
one graph replay per check once the graph is adopted) and the loss's asynchronous copy (a CPU
loss is read at once). :func:`fake_device_checks` installs it for a block, through
:func:`tolaria.health.plan.use_cpu_runtime`; governors built inside it should use
``health_backend="triton"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


class _Done:
    """An event, a stream and a graph that have nothing to wait for or run."""

    def record(self, stream: object = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def wait_event(self, event: object) -> None:
        return None

    def replay(self) -> None:
        return None


class FakeDevice:
    """Duck-types :class:`tolaria.health.device.DeviceRuntime` for CPU tensors (see the module
    docstring). ``launches_skipped`` counts the kernel launches it left out."""

    def __init__(self) -> None:
        self._nothing = _Done()
        self.launches_skipped = 0

    def current_device(self) -> None:
        return None

    def device(self, index: object) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def raw_stream(self, index: object) -> int:
        return 0

    def current_stream(self, device: object) -> Any:
        return self._nothing

    def event(self) -> Any:
        return _Done()

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def run_kernels(self, launch: Callable[[], None]) -> None:
        self.launches_skipped += 1

    def capture(self, device: object, enqueue: Callable[[], None]) -> Any:
        return self._nothing


def available() -> bool:
    """Whether the fused check's plans can be built here (they need an importable Triton)."""
    from tolaria.health.dispatch import triton_health

    return triton_health() is not None


@contextlib.contextmanager
def fake_device_checks() -> Iterator[FakeDevice]:
    """Within this block, ``backend="triton"`` checks of CPU tensors take the device path on a
    :class:`FakeDevice` (see the module docstring). RuntimeError when Triton does not import."""
    from tolaria.health.dispatch import triton_health, triton_health_error

    plan = triton_health()
    if plan is None:
        why = triton_health_error()
        raise RuntimeError(f"the fake device runs the fused check's plans, which need Triton: {why}")
    device = FakeDevice()
    with plan.use_cpu_runtime(device):
        yield device


__all__ = ["FakeDevice", "available", "fake_device_checks"]
