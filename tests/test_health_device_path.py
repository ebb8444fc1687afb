"""The CUDA code path of a health check (graph trial, streams, result slots) driven on CPU.

``plan.DeviceRuntime`` holds every CUDA call a device check makes; here a fake stands in for
it while the kernels run in the interpreter. The fake GPU can stay "busy": events recorded
then do not complete until ``finish()``, so a check that waited for the device would show up
as a ``synchronize()`` call. The same paths run for real under the ``cuda`` tests.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tolaria.health import reference_check

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    from tolaria.health import triton_kernels

    if not triton_kernels.INTERPRETED:
        pytest.skip("drives the device path with CPU tensors: needs TRITON_INTERPRET=1")


SMALL = {"block": 16, "chunk_blocks": 4}


class FakeEvent:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu, self.done = gpu, True

    def record(self, stream: object = None) -> None:
        self.done = not self.gpu.busy
        self.gpu.pending.append(self)

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.gpu.syncs += 1
        self.done = True


class FakeStream:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu

    def wait_event(self, event: FakeEvent) -> None:
        self.gpu.waits.append((self, event))


class FakeGraph:
    def __init__(self, gpu: FakeGpu, enqueue: Callable[[], None]) -> None:
        self.gpu, self.enqueue = gpu, enqueue

    def replay(self) -> None:
        self.gpu.replays += 1
        self.enqueue()
        if self.gpu.after_replay is not None:
            self.gpu.after_replay()


class FakeGpu:
    """Duck-types ``plan.DeviceRuntime`` for CPU tensors (whose device index is None)."""

    def __init__(self) -> None:
        self.busy = False
        self.pending: list[FakeEvent] = []
        self.syncs = self.replays = self.captures = 0
        self.waits: list[tuple[FakeStream, FakeEvent]] = []
        self.stream = FakeStream(self)
        self.after_replay: Callable[[], None] | None = None
        self.capture_error: Exception | None = None

    def finish(self) -> None:
        self.busy = False
        for event in self.pending:
            event.done = True

    def current_device(self) -> None:
        return None

    def device(self, index: object) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def raw_stream(self, index: object) -> int:
        return id(self.stream)

    def current_stream(self, device: object) -> FakeStream:
        return self.stream

    def event(self) -> FakeEvent:
        return FakeEvent(self)

    def run_kernels(self, launch: Callable[[], None]) -> None:
        launch()  # the kernels run (in the interpreter): these tests compare their results

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def capture(self, device: object, enqueue: Callable[[], None]) -> FakeGraph:
        if self.capture_error is not None:
            raise self.capture_error
        self.captures += 1
        return FakeGraph(self, enqueue)


def _model(seed: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=generator) for n in (5, 70, 300)]
    tensors.append(torch.randn(3, 80, generator=generator)[:, ::2])  # staged: copied inside the graph
    tensors.append(torch.arange(6))  # an integer tensor: its norm comes after the launches
    return [f"t{i}" for i in range(len(tensors))], tensors


def _plan(gpu: FakeGpu, tensors: list[torch.Tensor]) -> Any:
    from tolaria.health import plan

    return plan.build_plan(tensors, runtime=gpu, **SMALL)  # type: ignore[arg-type]


def _assert_reference(report: Any, names: list[str], tensors: list[torch.Tensor]) -> None:
    expected = reference_check(names, tensors)
    assert (report.nan, report.posinf, report.neginf) == (expected.nan, expected.posinf, expected.neginf)
    assert report.first_bad == expected.first_bad
    for got, want in zip(report.norms, expected.norms, strict=True):
        assert got == pytest.approx(want, rel=1e-5) if math.isfinite(want) else not math.isfinite(got)


def test_first_reuse_captures_and_compares_without_waiting() -> None:
    gpu, (names, tensors) = FakeGpu(), _model()
    built = _plan(gpu, tensors)
    gpu.busy = True  # nothing completes until finish(): a wait would be a synchronize()
    handles = [built.check(names, tensors) for _ in range(4)]
    assert gpu.syncs == 0 and gpu.captures == 1 and gpu.replays == 1  # the trial replay
    assert built.graph is None, "adopted before its verdict landed"
    assert not any(handle.ready() for handle in handles)
    assert len(built.slots) == 4  # unread handles keep their own pinned slot

    gpu.finish()
    assert all(handle.ready() for handle in handles)
    for handle in handles:
        _assert_reference(handle.result(), names, tensors)
    with torch.no_grad():
        tensors[2][123] = math.inf  # in place, after adoption: the replay must see it
        tensors[3][1, 7] = math.nan  # seen through the staging copy inside the graph
    report = built.check(names, tensors).result()
    assert built.graph is not None and gpu.replays == 2
    assert report.posinf[2] == 1 and report.nan[3] == 1 and report.first_bad == "t2"
    _assert_reference(report, names, tensors)
    assert len(built.slots) == 4  # read handles freed their slots for reuse


def test_mismatching_replay_is_discarded_and_never_delivered() -> None:
    gpu, (names, tensors) = FakeGpu(), _model(1)
    built = _plan(gpu, tensors)
    gpu.after_replay = lambda: built.out.fill_(12345.0)  # a graph that computes garbage
    first = built.check(names, tensors)
    trial = built.check(names, tensors)  # eager answer delivered; the replay's is compared
    _assert_reference(trial.result(), names, tensors)
    later = built.check(names, tensors)  # verdict landed: "different", so eager from now on
    assert built.graph is None and built._trial is None and gpu.replays == 1
    for handle in (first, later, built.check(names, tensors)):
        _assert_reference(handle.result(), names, tensors)


def test_capture_failure_keeps_eager_launches() -> None:
    gpu, (names, tensors) = FakeGpu(), _model(2)
    gpu.capture_error = RuntimeError("operation not permitted when stream is capturing")
    built = _plan(gpu, tensors)
    tensors[1][3] = -math.inf
    for _ in range(3):
        report = built.check(names, tensors).result()
        assert report.neginf[1] == 1
        _assert_reference(report, names, tensors)
    assert built.graph is None and built._trial is None


def test_graph_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLARIA_HEALTH_CUDA_GRAPH", "0")  # read when a plan is built
    gpu, (names, tensors) = FakeGpu(), _model(3)
    built = _plan(gpu, tensors)
    for _ in range(4):
        _assert_reference(built.check(names, tensors).result(), names, tensors)
    assert gpu.captures == 0 and built.graph is None


def test_a_new_stream_waits_for_the_last_check() -> None:
    gpu, (names, tensors) = FakeGpu(), _model(4)
    built = _plan(gpu, tensors)
    first = built.check(names, tensors)
    assert gpu.waits == []
    gpu.stream = side = FakeStream(gpu)
    built.check(names, tensors)
    assert gpu.waits == [(side, first._slot.event)]  # shared buffers: ordered after the last use
    built.check(names, tensors)
    assert len(gpu.waits) == 1  # same stream: stream order is enough
