"""The order in which a CUDA capture enqueues its work, driven on CPU with a fake GPU.

The real ordering (a step that tears without the pre-hook, ``snapshot()`` returning before
the copy) runs under the ``cuda`` marker in test_snapshot_native_cuda.py; here every CUDA
call of :class:`tolaria.snapshot.native.cuda.CudaEngine` is recorded so the sequence itself is
checked in CI: the parameters' copies and the health check come before *released*, the
scratch's copies (buffers, optimizer state) after it, and the optimizer step waits on
*released* only.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tolaria import _ext
from tolaria.snapshot.native import cuda as native_cuda

pytestmark = pytest.mark.skipif(
    _ext.extension() is None, reason=f"tolaria._C unavailable: {_ext.unavailable_reason()}"
)


class _Log(list):  # type: ignore[type-arg]
    """Every fake CUDA call, in order, as tuples."""


class _Event:
    def __init__(self, log: _Log, name: str) -> None:
        self.log, self.name = log, name

    def record(self, stream: int) -> None:
        self.log.append(("record", self.name, stream))

    def block_stream(self, stream: int) -> None:
        self.log.append(("wait", self.name, stream))


class _Native:
    """Stands in for ``tolaria._C``: events named in creation order."""

    def __init__(self, log: _Log) -> None:
        self.log, self.created = log, 0

    def CudaEvent(self, index: int) -> _Event:  # noqa: N802 (the extension's class name)
        name = ("ready", "released", "done")[self.created % 3]
        self.created += 1
        return _Event(self.log, name)


class _Copier:
    def __init__(self, log: _Log) -> None:
        self.log = log

    def capture_device(self, addresses: list[int], stream: int, device: int, slots: list[int]) -> None:
        assert len(addresses) == len(slots) > 0  # an empty slot list would mean "every slot"
        self.log.append(("copy", tuple(slots), stream))


CALLER, SIDE = 111, 222


def _engine(monkeypatch: pytest.MonkeyPatch, log: _Log) -> native_cuda.CudaEngine:
    engine = native_cuda.CudaEngine(_Native(log))  # type: ignore[arg-type]
    monkeypatch.setattr(engine, "side_stream", lambda device: SimpleNamespace(cuda_stream=SIDE))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=CALLER))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())

    def check(pairs: list[tuple[str, torch.Tensor]], **kwargs: Any) -> str:
        log.append(("check", tuple(sorted(name for name, _ in pairs)), kwargs["blocking"]))
        return "health-handle"

    monkeypatch.setattr(native_cuda, "check_tensors", check)
    return engine


def _plan(direct: list[int], ordered: list[int], sources: list[torch.Tensor]) -> SimpleNamespace:
    """Slot s holds key s; ``sources`` are the tensors of the ordered slots."""
    keys = tuple(f"k{slot}" for slot in range(len(direct) + len(ordered)))
    scratch = SimpleNamespace(
        views=[torch.zeros_like(t) for t in sources],
        addresses=[1000 + slot for slot in ordered],
        checks=[(keys[slot], None) for slot in ordered],
    )
    return SimpleNamespace(
        device=torch.device("cuda", 0),
        keys=keys,
        direct=direct,
        ordered=ordered,
        foreign=[],
        slot_key=list(range(len(keys))),
        direct_checks=[(slot, False) for slot in direct],
        direct_addresses=lambda tensors: [2000 + slot for slot in direct],
        scratch=lambda: scratch,
    )


def test_parameters_and_health_come_before_released_and_the_scratch_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = _Log()
    engine = _engine(monkeypatch, log)
    moments = [torch.full((3,), 5.0), torch.full((2,), 7.0)]
    plan = _plan(direct=[0, 1], ordered=[2, 3], sources=moments)
    tensors = (torch.ones(1), torch.ones(1), *moments)
    health, events = engine.capture(
        plan, SimpleNamespace(copier=_Copier(log), slot_views=[]), tensors, "auto"
    )  # type: ignore[arg-type]
    assert health == "health-handle"
    assert [view.tolist() for view in plan.scratch().views] == [t.tolist() for t in moments]
    assert log == [
        ("record", "ready", CALLER),  # after the scratch copies, on the caller's stream
        ("wait", "ready", SIDE),
        ("copy", (0, 1), SIDE),  # the live parameters
        ("check", ("k0", "k1", "k2", "k3"), False),  # parameters and scratch, non-blocking
        ("record", "released", SIDE),
        ("copy", (2, 3), SIDE),  # the store's own scratch: may overlap the next step
        ("record", "done", SIDE),
    ]
    assert (events.released.name, events.done.name) == ("released", "done")


@pytest.mark.parametrize(
    ("direct", "ordered"), [([0, 1], []), ([], [0, 1])], ids=["params-only", "scratch-only"]
)
def test_an_empty_side_enqueues_no_copy(
    monkeypatch: pytest.MonkeyPatch, direct: list[int], ordered: list[int]
) -> None:
    log = _Log()
    engine = _engine(monkeypatch, log)
    sources = [torch.ones(2) for _ in ordered]
    plan = _plan(direct=direct, ordered=ordered, sources=sources)
    tensors = tuple(torch.ones(2) for _ in range(2))
    engine.capture(plan, SimpleNamespace(copier=_Copier(log), slot_views=[]), tensors, "auto")  # type: ignore[arg-type]
    copies = [entry for entry in log if entry[0] == "copy"]
    assert copies == [("copy", (0, 1), SIDE)]
    released, done = log.index(("record", "released", SIDE)), log.index(("record", "done", SIDE))
    assert (log.index(copies[0]) < released) == bool(direct) and released < done


def test_make_stream_wait_waits_on_released_not_done(monkeypatch: pytest.MonkeyPatch) -> None:
    from tolaria.snapshot.native.store import NativeSnapshotStore, _Pending

    log = _Log()
    store = NativeSnapshotStore()
    events = native_cuda.CaptureEvents(_Event(log, "released"), _Event(log, "done"))
    store._pending = _Pending(SimpleNamespace(plan=SimpleNamespace(device=None)), (), events=events)  # type: ignore[arg-type]
    store.make_stream_wait(SimpleNamespace(cuda_stream=CALLER))  # type: ignore[arg-type]
    assert log == [("wait", "released", CALLER)]
    assert store._pending.done is events.done
    store._pending = None


@pytest.mark.parametrize("backend", ["reference", "auto-without-triton"])
def test_a_synchronous_health_check_is_announced_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    log = _Log()
    engine = _engine(monkeypatch, log)
    if backend != "reference":
        monkeypatch.setattr(native_cuda, "triton_health", lambda: None)  # Triton unavailable
    plan = _plan(direct=[0], ordered=[], sources=[])
    staging = SimpleNamespace(copier=_Copier(log), slot_views=[])
    with caplog.at_level("WARNING", logger=native_cuda.__name__):
        for _ in range(2):
            engine.capture(plan, staging, (torch.ones(1),), backend.split("-")[0])  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if "waits for the parameters" in r.getMessage()]
    assert len(warnings) == 1 and "Install Triton" in warnings[0]


def test_the_triton_check_is_not_announced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = _Log()
    engine = _engine(monkeypatch, log)
    monkeypatch.setattr(native_cuda, "triton_health", lambda: native_cuda)  # any module: importable
    plan = _plan(direct=[0], ordered=[], sources=[])
    with caplog.at_level("WARNING", logger=native_cuda.__name__):
        engine.capture(plan, SimpleNamespace(copier=_Copier(log), slot_views=[]), (torch.ones(1),), "auto")  # type: ignore[arg-type]
    assert not caplog.records
