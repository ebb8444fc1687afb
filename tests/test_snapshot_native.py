"""The native snapshot engine on CPU: the compiled primitives and NativeSnapshotStore, with the
pure-PyTorch ReferenceSnapshotStore as the oracle. CUDA behaviour: test_snapshot_native_cuda.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tolaria import _ext, telemetry
from tolaria.snapshot import make_store
from tolaria.snapshot.reference import ReferenceSnapshotStore
from tolaria.snapshot.store import SnapshotMismatchError

_C = _ext.extension()
pytestmark = pytest.mark.skipif(_C is None, reason=f"tolaria._C unavailable: {_ext.unavailable_reason()}")

if _C is not None:
    from tolaria.snapshot.native import NativeSnapshotStore

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        flat = values.view(-1)
        if flat.numel() >= 3:  # values whose bits a sloppy copy would lose
            flat[0], flat[1] = -0.0, torch.finfo(dtype).tiny / 2
            flat[2] = torch.finfo(dtype).max
        return values
    return torch.randint(0, 100, shape, generator=gen, dtype=dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().resolve_conj().contiguous().view(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    shared = _random((6, 5), torch.float32, seed)
    state = {f"t_{str(d).split('.')[-1]}": _random((3, 7), d, seed + i) for i, d in enumerate(DTYPES)}
    state.update(
        {
            "embed.weight": shared,
            "head.weight": shared,  # tied: one slot
            "strided": _random((5, 4), torch.float32, seed + 20).t(),
            "sliced": _random((8, 8), torch.float16, seed + 21)[::2, 1:5],
            "empty": torch.empty(0, 3),
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "complex_conj": torch.randn(
                4, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed)
            ).conj(),
        }
    )
    return state


def _committed(store: object, state: dict[str, torch.Tensor], meta: object = None) -> None:
    store.capture(state, meta=meta)  # type: ignore[attr-defined]
    resolution = store.resolve()  # type: ignore[attr-defined]
    assert resolution is not None and resolution.committed


# -- the compiled primitives --------------------------------------------------------------------


def test_plan_layout_aligns_packs_and_chunks() -> None:
    layout = _C.plan_layout([10, 300, 5, 2000, 7], 256, 1024)
    assert all(offset % 256 == 0 for offset in layout.offsets)
    assert layout.chunk_index == [0, 0, 0, 1, 2]  # 2000 > chunk: a chunk of its own
    assert layout.offsets == [0, 256, 768, 0, 0]
    assert layout.chunk_sizes == [773, 2000, 7]
    with pytest.raises(ValueError, match="sizes\\[1\\] is 0"):
        _C.plan_layout([4, 0])
    with pytest.raises(ValueError, match="power of two"):
        _C.plan_layout([4], 300)


def test_copy_plan_round_trips_and_splits_large_copies_across_threads() -> None:
    sizes = [12 << 20, 3, 9 << 20]  # > 16 MiB in all: the threaded path, with a cut inside a slot
    layout = _C.plan_layout(sizes)
    arena = _C.HostArena(layout.chunk_sizes)
    plan = _C.CopyPlan(arena, layout)
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    plan.capture_host([s.data_ptr() for s in sources], threads=3)
    chunk = torch.frombuffer(arena.chunks[0], dtype=torch.uint8)
    for source, offset in zip(sources, layout.offsets, strict=True):
        assert torch.equal(chunk[offset : offset + source.numel()], source)
    targets = [torch.zeros_like(s) for s in sources]
    plan.restore_host([t.data_ptr() for t in targets[::2]], threads=2, slots=[0, 2])
    assert torch.equal(targets[0], sources[0]) and torch.equal(targets[2], sources[2])
    assert not targets[1].any()  # slot 1 was not asked for
    with pytest.raises(ValueError, match="expected 3 tensor addresses"):
        plan.capture_host([sources[0].data_ptr()])
    with pytest.raises(ValueError, match="out of range"):
        plan.restore_host([targets[0].data_ptr()], slots=[5])


def test_chunk_views_outlive_their_arena() -> None:
    layout = _C.plan_layout([64])
    arena = _C.HostArena(layout.chunk_sizes)
    view = torch.frombuffer(arena.chunks[0], dtype=torch.uint8)
    view.fill_(7)
    del arena
    assert int(view.sum()) == 7 * 64  # the chunk is owned by the view now


@no_gpu
def test_without_a_gpu_pinning_falls_back_and_cuda_calls_raise() -> None:
    arena = _C.HostArena([1024], pin=True, device=0)
    assert not arena.pinned and "pageable" in arena.fallback_reason
    with pytest.raises(_C.CudaError):
        _C.CudaEvent(0)


# -- the store ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (257,), (3, 5, 2)], ids=str)
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    state = {"x": _random(shape, dtype), "y": _random((4,), dtype, seed=1)}
    store = NativeSnapshotStore()
    _committed(store, state)
    expected = {k: v.clone() for k, v in state.items()}
    for tensor in state.values():
        tensor.zero_()
    result = store.restore(state)
    assert result.restored_keys == ("x", "y") and not result.missing_keys and not result.unexpected_keys
    assert all(_same_bits(state[k], expected[k]) for k in state)


def test_mixed_state_tied_strided_empty_and_identity() -> None:
    state = _mixed_state()
    expected = {k: v.clone() for k, v in state.items()}
    store = NativeSnapshotStore()
    ticket = store.capture(state)
    assert not ticket.in_flight and ticket.rebuilt
    shared = state["embed.weight"]
    assert ticket.nbytes == sum(v.numel() * v.element_size() for k, v in state.items() if k != "head.weight")
    assert store.resolve().committed
    lkg = store.last_good_state
    assert lkg["embed.weight"].data_ptr() == lkg["head.weight"].data_ptr()  # stored once
    assert all(_same_bits(lkg[k], expected[k]) for k in state)
    assert not any(v.requires_grad for v in lkg.values())
    for tensor in state.values():
        tensor.zero_()
    store.restore(state)
    assert state["embed.weight"] is shared and state["head.weight"] is shared
    assert all(_same_bits(state[k], expected[k]) for k in state)


def test_restore_into_the_captured_objects_takes_the_planned_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Governor's rollback restores into the very tensors it captured: no per-key walk.
    from tolaria.snapshot.native import store as native

    state = _mixed_state()
    expected = {k: v.clone() for k, v in state.items()}
    store = NativeSnapshotStore()
    _committed(store, state)
    for tensor in state.values():
        tensor.zero_()
    monkeypatch.setattr(native, "normalize_named_tensors", lambda *a, **k: pytest.fail("walked the targets"))
    result = store.restore(list(state.items()))  # an iterable of pairs, read once
    assert result.restored_keys == tuple(state) and not result.missing_keys and not result.unexpected_keys
    assert all(_same_bits(state[k], expected[k]) for k in state)


def test_restore_into_other_tensors_walks_the_targets() -> None:
    state = _mixed_state()
    store = NativeSnapshotStore()
    _committed(store, state)
    fresh = {k: v.detach().clone().zero_() for k, v in state.items()}  # same strides, untied
    store.restore(fresh)
    assert all(_same_bits(fresh[k], state[k]) for k in state)


def test_a_tie_broken_after_the_capture_restores_both_tensors() -> None:
    state = _mixed_state()
    state["head.weight"] = state["embed.weight"].view_as(state["embed.weight"])  # another object, tied
    expected = state["embed.weight"].clone()
    store = NativeSnapshotStore()
    _committed(store, state)
    state["head.weight"].data = torch.zeros_like(expected)  # same object, its own memory now
    state["embed.weight"].zero_()
    store.restore(state)
    assert _same_bits(state["head.weight"], expected) and _same_bits(state["embed.weight"], expected)


def test_a_shape_changed_after_the_capture_is_refused_before_anything_is_written() -> None:
    weight = nn.Parameter(_random((4, 4), torch.float32))
    strided = _random((5, 4), torch.float32, 1).t()  # restored through Tensor.copy_
    state = {"a": nn.Parameter(_random((4,), torch.float32, 2)), "w": weight, "s": strided}
    store = NativeSnapshotStore()
    _committed(store, state)
    weight.data = weight.data.view(2, 8)  # the same object and bytes, another shape
    state["a"].data.zero_()
    with pytest.raises(SnapshotMismatchError, match="w: live"):
        store.restore(state)
    assert bool((state["a"] == 0).all())  # nothing written


def test_a_tie_formed_after_the_capture_gets_the_first_keys_value() -> None:
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.full((4,), 2.0))
    state = {"a": a, "b": b}
    store = NativeSnapshotStore()
    _committed(store, state)
    b.data = a.data  # one memory for both keys now; the full path writes the first key's value
    a.data.zero_()
    store.restore(state)
    assert a.tolist() == [1.0] * 4 and b.data_ptr() == a.data_ptr()


@pytest.mark.parametrize("targets", ["captured", "fresh"])
def test_lazy_negative_and_conjugate_views_keep_their_values_apart_from_their_bases(targets: str) -> None:
    real = _random((4,), torch.float32)
    cplx = torch.randn(3, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    state = {"real": real, "neg": torch._neg_view(real), "cplx": cplx, "conj": cplx.conj()}
    expected = {k: v.resolve_neg().resolve_conj().clone() for k, v in state.items()}
    store = NativeSnapshotStore()
    _committed(store, state)
    lkg = store.last_good_state
    assert all(torch.equal(lkg[k].resolve_neg().resolve_conj(), expected[k]) for k in state)
    if targets == "fresh":
        state = {k: torch.zeros_like(v.resolve_neg().resolve_conj()) for k, v in state.items()}
    else:
        real.zero_()
        cplx.zero_()
    store.restore(state)
    assert all(torch.equal(state[k].resolve_neg().resolve_conj(), expected[k]) for k in state)


def test_parameters_and_batchnorm_buffers_restore_in_place() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    params = list(model.parameters())
    store = NativeSnapshotStore()
    _committed(store, model.state_dict(keep_vars=True))
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(16, 4)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.equal(model[1].running_mean, saved["1.running_mean"])
    store.restore(model.state_dict(keep_vars=True))
    assert list(model.parameters()) == params  # same objects
    assert all(_same_bits(v, saved[k]) for k, v in model.state_dict().items())


def test_layout_change_rebuilds_the_arena_and_restore_reports_key_drift() -> None:
    base = {"a": _random((4,), torch.float32), "b": _random((3,), torch.float16)}
    store = NativeSnapshotStore()
    assert store.capture(base).rebuilt
    store.resolve()
    assert not store.capture(base).rebuilt  # same structure: the spare arena is reused
    store.resolve()
    grown = dict(base, **{"seed.w": _random((5,), torch.float32, 3)})  # a seed germinated
    assert store.capture(grown).rebuilt
    store.resolve()
    assert store.keys == ("a", "b", "seed.w")
    reshaped = dict(base, a=_random((2, 2), torch.float32))
    assert store.capture(reshaped).rebuilt  # same keys, new shape
    store.resolve()
    result = store.restore({"a": torch.zeros(2, 2), "new": torch.zeros(1)})
    assert result.missing_keys == ("new",) and result.unexpected_keys == ("b",)
    with pytest.raises(SnapshotMismatchError, match="a: live"):
        store.restore({"a": torch.zeros(4)})


def test_same_objects_skip_the_full_signature_but_data_swaps_are_caught() -> None:
    weight = nn.Parameter(_random((6,), torch.float32))
    bias = nn.Parameter(_random((3,), torch.float32, 1))
    store = NativeSnapshotStore()
    assert store.capture({"w": weight, "b": bias}).rebuilt
    store.resolve()
    with torch.no_grad():
        weight.add_(1.0)  # values change, structure does not
    assert not store.capture({"w": weight, "b": bias}).rebuilt
    store.resolve()
    assert torch.equal(store.last_good_state["w"], weight.detach())

    weight.data = _random((8,), torch.float32, 2)  # same Parameter object, new size and address
    assert store.capture({"w": weight, "b": bias}).rebuilt
    store.resolve()
    assert store.last_good_state["w"].shape == (8,)
    assert torch.equal(store.last_good_state["w"], weight.detach())

    weight.data = weight.data.to(torch.float64)  # same object, new dtype
    assert store.capture({"w": weight, "b": bias}).rebuilt
    store.resolve()
    assert store.last_good_state["w"].dtype == torch.float64

    bias.data = bias.data.repeat(2)[::2]  # same object, same size, now strided: copied safely
    assert store.capture({"w": weight, "b": bias}).rebuilt
    store.resolve()
    assert torch.equal(store.last_good_state["b"], bias.detach())


def test_a_sick_capture_is_not_committed() -> None:
    state = {"w": _random((64,), torch.float32), "h": _random((8,), torch.bfloat16), "n": torch.arange(3)}
    store = NativeSnapshotStore()
    _committed(store, state, meta="good")
    good = {k: v.clone() for k, v in state.items()}
    state["h"][5] = float("nan")
    store.capture(state, meta="sick")
    resolution = store.resolve()
    assert not resolution.committed and resolution.first_bad == "h"
    assert store.lkg_meta == "good"
    assert all(_same_bits(store.last_good_state[k], good[k]) for k in good)
    state["h"][5] = float("inf")
    store.capture(state)
    assert store.resolve().first_bad == "h"


def test_rollback_while_a_capture_is_staged_restores_the_previous_lkg() -> None:
    state = {"w": _random((32,), torch.float32)}
    store = NativeSnapshotStore()
    _committed(store, state, meta=1)
    previous = state["w"].clone()
    state["w"].add_(1.0)
    store.capture(state, meta=2)  # staged, healthy, not resolved
    assert store.in_flight
    store.restore(state)
    assert not store.in_flight and store.lkg_meta == 1
    assert _same_bits(state["w"], previous)


def test_native_and_reference_stores_produce_identical_lkgs() -> None:
    native, reference = NativeSnapshotStore(), ReferenceSnapshotStore()
    for seed in range(3):
        state = _mixed_state(seed)
        for store in (native, reference):
            _committed(store, state, meta=seed)
        ours, theirs = native.last_good_state, reference.last_good_state
        assert list(ours) == list(theirs) and native.keys == reference.keys
        assert all(_same_bits(ours[k], theirs[k]) for k in theirs)
        assert native.lkg_meta == reference.lkg_meta == seed


def test_last_good_state_is_a_view_over_the_committed_arena() -> None:
    state = {"w": _random((1000,), torch.float32), "b": _random((10,), torch.float64)}
    store = NativeSnapshotStore()
    _committed(store, state)
    first = store.last_good_state
    assert store.last_good_state is first  # same dict between commits
    lkg = store._lkg
    chunk = lkg.arena.chunks[0]
    assert all(chunk.address <= v.data_ptr() < chunk.address + chunk.nbytes for v in first.values())
    _committed(store, {k: v + 1 for k, v in state.items()})  # into the other buffer
    second = store.last_good_state
    assert second is not first and second["w"].data_ptr() != first["w"].data_ptr()
    _committed(store, {k: v + 2 for k, v in state.items()})  # back into the first buffer
    assert torch.equal(first["w"], state["w"] + 2)  # the old dict sees the arena, not a copy


def test_single_buffer_overwrites_the_lkg_in_place() -> None:
    state = {"w": _random((16,), torch.float32)}
    store = NativeSnapshotStore(double_buffer=False)
    _committed(store, state)
    address = store.last_good_state["w"].data_ptr()
    store.capture({"w": state["w"] * 0.5})
    assert not store.has_lkg  # the weaker guarantee: the one arena is being rewritten
    with pytest.raises(RuntimeError, match="no committed"):
        store.restore(state)
    assert store.resolve().committed
    assert store.last_good_state["w"].data_ptr() == address
    store.capture({"w": torch.full((16,), float("nan"))})
    assert not store.resolve().committed and not store.has_lkg


def test_bad_input_raises_and_leaves_the_lkg() -> None:
    store = NativeSnapshotStore()
    _committed(store, {"w": torch.ones(3)}, meta="ok")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        store.capture({"w": [1.0, 2.0]})
    with pytest.raises(ValueError, match="duplicate key"):
        store.capture([("w", torch.ones(3)), ("w", torch.ones(3))])
    with pytest.raises(TypeError, match="keys must be str"):
        store.capture({1: torch.ones(3)})
    assert store.lkg_meta == "ok" and not store.in_flight
    with pytest.raises(ValueError, match="threads"):
        NativeSnapshotStore(threads=-1)
    with pytest.raises(ValueError, match="alignment"):
        NativeSnapshotStore(alignment=384)
    with pytest.raises(TypeError, match="pin_memory"):
        NativeSnapshotStore(pin_memory="yes")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no committed"):
        NativeSnapshotStore().restore({"w": torch.ones(3)})


def test_large_arena_in_small_chunks_round_trips() -> None:
    state = {f"w{i}": _random((300_000,), torch.float32, i) for i in range(4)}  # ~4.8 MB
    store = NativeSnapshotStore(chunk_bytes=1 << 20, threads=2)
    _committed(store, state)
    assert len(store._lkg.arena.chunks) == 4
    assert all(_same_bits(store.last_good_state[k], v) for k, v in state.items())


@no_gpu
def test_pinning_fallback_emits_one_degraded_event_and_keeps_working() -> None:
    events: list[telemetry.TelemetryEvent] = []
    previous = telemetry.set_hub(telemetry.TelemetryHub([telemetry.CallbackSink(events.append)]))
    try:
        store = NativeSnapshotStore(pin_memory=True)
        _committed(store, {"w": torch.ones(4)})
        _committed(store, {"w": torch.ones(4)})  # second arena: no second event
    finally:
        telemetry.set_hub(previous)
    degraded = [e for e in events if e.event_type == telemetry.TelemetryEventType.SNAPSHOT_DEGRADED]
    assert len(degraded) == 1 and degraded[0].data.backend == "native"
    assert not store.pinned and torch.equal(store.last_good_state["w"], torch.ones(4))


def test_make_store_picks_native() -> None:
    assert isinstance(make_store("native"), NativeSnapshotStore)
    assert make_store("auto").backend == "native"


def test_a_vetoed_commit_is_taken_back() -> None:
    state = {"w": _random((8,), torch.float32)}
    store = NativeSnapshotStore()
    _committed(store, state, meta="first")
    first = state["w"].clone()
    store.capture({"w": state["w"] + 1}, meta="second")
    resolution = store.resolve_agreed(lambda healthy: False)  # another rank was sick
    assert resolution is not None and resolution.vetoed and not resolution.committed
    assert store.lkg_meta == "first" and _same_bits(store.last_good_state["w"], first)
    store.capture({"w": state["w"] + 2}, meta="third")  # the rejected buffer is the spare again
    assert store.resolve_agreed(lambda healthy: healthy).committed and store.lkg_meta == "third"
