"""The native snapshot engine on CUDA: stream ordering, pinned arenas, asynchronous capture.

Every test carries the ``cuda`` marker (skipped without a GPU; run on the GPU machine through
bench/gpu_check.sh). ``torch.cuda._sleep`` keeps a stream busy so that the orderings under test
are forced rather than left to timing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tolaria import _ext
from tolaria.snapshot.reference import ReferenceSnapshotStore

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _ext.cuda_runtime_usable(), reason="tolaria._C without a usable CUDA runtime"),
]

SLEEP_CYCLES = 200_000_000  # ~0.1 s on a 2 GHz GPU clock


def _warm(store, named: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    """Two resolved captures, so the arena, the health check's plan and its CUDA-graph trial are
    all in place and the capture under test does no first-time work."""
    for _ in range(2):
        store.capture(named)
        store.resolve()


def _store(**options: object):  # type: ignore[no-untyped-def]
    from tolaria.snapshot.native import NativeSnapshotStore

    return NativeSnapshotStore(**options)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().resolve_conj().contiguous().view(-1).view(torch.uint8)


def _big_parameter(mib: int, value: float = 1.0) -> nn.Parameter:
    return nn.Parameter(torch.full((mib << 18,), value, device="cuda"))  # 4-byte floats


def test_primitives_copy_on_legacy_and_side_streams() -> None:
    _C = _ext.require_extension()
    sizes = [4096, 3, 1 << 20]
    layout = _C.plan_layout(sizes)
    arena = _C.HostArena(layout.chunk_sizes, pin=True, device=0)
    assert arena.pinned, arena.fallback_reason
    plan = _C.CopyPlan(arena, layout)
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda") for n in sizes]
    side = torch.cuda.Stream()
    for stream in (0, side.cuda_stream):  # legacy stream: cudaMemcpyAsync loop; side: batched
        torch.cuda.synchronize()
        plan.capture_device([s.data_ptr() for s in sources], stream, 0)
        event = _C.CudaEvent(0)
        event.record(stream)
        event.synchronize()
        assert event.query()
        chunk = torch.frombuffer(arena.chunks[0], dtype=torch.uint8)
        for source, offset in zip(sources, layout.offsets, strict=True):
            assert torch.equal(chunk[offset : offset + source.numel()], source.cpu())
        targets = [torch.zeros_like(s) for s in sources]
        plan.restore_device([t.data_ptr() for t in targets], stream, 0)
        assert all(torch.equal(t, s) for t, s in zip(targets, sources, strict=True))


def test_round_trip_is_bit_exact_pinned_and_keeps_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)).cuda()
    params = list(model.parameters())
    store = _store()
    ticket = store.capture(model.state_dict(keep_vars=True))
    assert ticket.in_flight
    assert store.resolve().committed
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lkg = store.last_good_state
    assert store.pinned
    assert all(v.device.type == "cpu" and v.is_pinned() for v in lkg.values() if v.numel())
    assert all(torch.equal(_bits(lkg[k]), _bits(v)) for k, v in saved.items())
    model.train()
    model(torch.randn(8, 16, device="cuda")).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(float("nan"))
    store.restore(model.state_dict(keep_vars=True))
    assert list(model.parameters()) == params
    assert all(torch.equal(_bits(v), _bits(saved[k])) for k, v in model.state_dict().items())


def test_capture_is_ordered_after_work_queued_on_the_current_stream() -> None:
    weight = _big_parameter(16, 0.0)
    running = torch.zeros(1 << 20, device="cuda")  # a buffer: copied in stream order
    other = torch.cuda.Stream()
    store = _store()
    with torch.cuda.stream(other):
        torch.cuda._sleep(SLEEP_CYCLES)
        with torch.no_grad():
            weight.fill_(3.0)
            running.fill_(1.0)
        store.capture({"w": weight, "running": running})
        running.fill_(2.0)  # forward of the next step: queued after the capture on this stream
    assert store.resolve().committed
    lkg = store.last_good_state
    ordered = bool((lkg["w"] == 3.0).all()) and bool((lkg["running"] == 1.0).all())
    assert ordered


def test_optimizer_pre_hook_ordering_prevents_a_torn_capture() -> None:
    def captured_after_a_step(with_hook: bool) -> torch.Tensor:
        weight = _big_parameter(512, 1.0)
        weight.grad = torch.ones_like(weight)
        optimizer = torch.optim.SGD([weight], lr=1.0)  # one step writes 0.0 everywhere
        store = _store()
        _warm(store, {"w": weight})
        if with_hook:
            optimizer.register_step_pre_hook(lambda *_: store.make_stream_wait())
        store.capture({"w": weight})
        optimizer.step()  # 512 MiB device->host takes far longer than this step
        store.resolve()
        return store.last_good_state["w"]

    # Plain bools: pytest would otherwise try to print the 128M-element comparison.
    torn = bool((captured_after_a_step(with_hook=False) == 0.0).any())
    assert torn, "without the pre-hook the step should overwrite the in-flight copy"
    intact = bool((captured_after_a_step(with_hook=True) == 1.0).all())
    assert intact


def test_snapshot_returns_before_the_copy_completes() -> None:
    weight = _big_parameter(1024)
    store = _store()
    _warm(store, {"w": weight})
    torch.cuda.synchronize()
    ticket = store.capture({"w": weight})
    probe = torch.cuda.Stream()
    store.make_stream_wait(probe)
    marker = torch.cuda.Event()
    marker.record(probe)
    still_copying = not marker.query()  # 1 GiB device->host takes tens of ms
    assert ticket.in_flight and still_copying
    assert store.resolve().committed
    marker.synchronize()


def test_the_optimizer_waits_for_the_parameters_not_for_the_optimizer_state() -> None:
    # A small parameter and 1 GiB of optimizer-like state (not a Parameter: it goes through the
    # device scratch, copied after *released*). The step's wait ends while that copy still runs.
    weight = _big_parameter(1)
    moments = torch.ones(1 << 28, device="cuda")
    store = _store()
    named = {"w": weight, "exp_avg": moments}
    _warm(store, named)
    torch.cuda.synchronize()
    store.capture(named)
    probe = torch.cuda.Stream()
    store.make_stream_wait(probe)
    marker = torch.cuda.Event()
    marker.record(probe)
    marker.synchronize()  # the parameter's copy and the health check are done
    assert not store._pending.done.query()  # 1 GiB device->host: tens of ms still to go
    moments.fill_(float("nan"))  # the step writes the live state: the scratch copy is unaffected
    resolution = store.resolve()
    assert resolution.committed
    assert bool((store.last_good_state["exp_avg"] == 1.0).all())


def test_restore_waits_for_queued_work_then_writes() -> None:
    weight = _big_parameter(16, 2.0)
    store = _store()
    store.capture({"w": weight})
    store.resolve()
    with torch.no_grad():
        torch.cuda._sleep(SLEEP_CYCLES)
        weight.fill_(5.0)  # still queued when restore starts
    store.restore({"w": weight})
    restored = bool((weight == 2.0).all())
    assert restored


def test_sick_capture_on_cuda_is_not_committed() -> None:
    weight, bias = _big_parameter(1, 1.0), nn.Parameter(torch.zeros(10, device="cuda"))
    store = _store()
    store.capture({"w": weight, "b": bias}, meta="good")
    store.resolve()
    with torch.no_grad():
        bias[3] = float("nan")
    store.capture({"w": weight, "b": bias}, meta="sick")
    resolution = store.resolve()
    assert not resolution.committed and resolution.first_bad == "b"
    assert store.lkg_meta == "good" and not store.last_good_state["b"].isnan().any()


def test_native_and_reference_agree_on_cuda() -> None:
    torch.manual_seed(1)
    shared = nn.Parameter(torch.randn(50, 8, device="cuda"))
    state = {
        "embed": shared,
        "head": shared,
        "half": nn.Parameter(torch.randn(33, device="cuda", dtype=torch.float16)),
        "bf16": nn.Parameter(torch.randn(7, 3, device="cuda", dtype=torch.bfloat16)),
        "double": torch.randn(5, device="cuda", dtype=torch.float64),
        "steps": torch.tensor(12, device="cuda"),
        "mask": torch.rand(9, device="cuda") > 0.5,
        "strided": nn.Parameter(torch.randn(6, 4, device="cuda")).t(),
        "empty": torch.empty(0, 2, device="cuda"),
        "cpu_side": torch.randn(4),  # a foreign tensor: copied synchronously
    }
    native, reference = _store(), ReferenceSnapshotStore()
    for store in (native, reference):
        store.capture(state)
        assert store.resolve().committed
    ours, theirs = native.last_good_state, reference.last_good_state
    assert list(ours) == list(theirs)
    assert all(torch.equal(_bits(ours[k]), _bits(theirs[k])) for k in theirs)
