"""The pure-PyTorch snapshot store: capture → verify → commit, restore, and the factory."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tolaria import telemetry
from tolaria.snapshot import (
    SNAPSHOT_BACKENDS,
    ReferenceSnapshotStore,
    SnapshotMismatchError,
    SnapshotStore,
    make_store,
    reference,
)

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTS = [torch.int64, torch.int32, torch.uint8, torch.bool]


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, 200, shape, generator=gen).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A bit-exact comparable copy (floats as raw integers, so -0.0 != 0.0)."""
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()
    return t.clone()


def scramble(tensors: dict[str, torch.Tensor]) -> None:
    for t in tensors.values():
        t.data.copy_(torch.ones_like(t) if t.dtype == torch.bool else t * 0 + 7)


def committed_store(named: dict[str, torch.Tensor], **kwargs: object) -> ReferenceSnapshotStore:
    store = ReferenceSnapshotStore(**kwargs)  # type: ignore[arg-type]
    store.capture(named)
    resolution = store.resolve()
    assert resolution is not None and resolution.committed
    return store


@pytest.mark.parametrize("dtype", FLOATS + INTS, ids=str)
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    named = {
        "a": make_tensor((5, 3), dtype),
        "b": make_tensor((7,), dtype, 1),
        "empty": make_tensor((0, 4), dtype),
    }
    named["neg_zero"] = (
        torch.zeros(3, dtype=dtype)
        if not dtype.is_floating_point
        else torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)
    )
    expected = {k: bits(v) for k, v in named.items()}
    store = committed_store(named)
    scramble(named)
    result = store.restore(named)
    assert set(result.restored_keys) == set(named) and result.missing_keys == result.unexpected_keys == ()
    for key, value in named.items():
        assert torch.equal(bits(value), expected[key]), key


@settings(max_examples=50, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.lists(st.integers(0, 6), max_size=3), st.sampled_from(FLOATS + INTS), st.booleans()),
        min_size=1,
        max_size=8,
    )
)
def test_any_mix_of_shapes_dtypes_and_layouts_round_trips(specs: list) -> None:
    named = {}
    for i, (shape, dtype, transpose) in enumerate(specs):
        t = make_tensor(tuple(shape), dtype, i)
        named[f"t{i}"] = t.t() if transpose and t.dim() == 2 else t  # non-contiguous views too
    expected = {k: bits(v) for k, v in named.items()}
    store = committed_store(named)
    assert store.keys == tuple(named)
    scramble(named)
    store.restore(list(named.items()))
    assert all(torch.equal(bits(named[k]), expected[k]) for k in named)


def test_parameters_keep_identity_and_grad_flag() -> None:
    model = torch.nn.Linear(4, 3)
    params = dict(model.named_parameters())
    before = {k: bits(v) for k, v in params.items()}
    store = committed_store(model.state_dict(keep_vars=True))
    with torch.no_grad():
        model.weight.fill_(9)
    store.restore(model.state_dict(keep_vars=True))
    assert all(params[k] is p for k, p in model.named_parameters())
    assert model.weight.requires_grad and torch.equal(bits(model.weight), before["weight"])


def test_tied_weights_are_stored_once_and_restored_to_both() -> None:
    shared = make_tensor((8, 4), torch.float32)
    named = {"embed": shared, "head": shared, "bias": make_tensor((4,), torch.float32)}
    store = ReferenceSnapshotStore()
    ticket = store.capture(named)
    assert ticket.nbytes == (32 + 4) * 4
    store.resolve()
    # Untie the live tensors: both must still receive the saved value.
    live = {"embed": torch.zeros(8, 4), "head": torch.ones(8, 4), "bias": torch.zeros(4)}
    store.restore(live)
    assert torch.equal(live["embed"], shared) and torch.equal(live["head"], shared)


def test_buffers_are_reused_and_rebuilt_only_when_the_structure_changes() -> None:
    named = {"w": make_tensor((16,), torch.float32), "n": make_tensor((2,), torch.int64)}
    store = ReferenceSnapshotStore()
    tickets, ptrs = [], []
    for _ in range(4):
        tickets.append(store.capture(named))
        store.resolve()
        ptrs.append(store.last_good_state["w"].data_ptr())  # type: ignore[index]
    assert [t.rebuilt for t in tickets] == [True, True, False, False]  # LKG + spare, then reuse
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] and ptrs[0] != ptrs[1]  # double buffering
    named["w"] = make_tensor((16,), torch.float32, 5)  # new memory, same structure
    assert not store.capture(named).rebuilt
    store.resolve()
    named["seed.w"] = make_tensor((3,), torch.float32)  # a seed germinates
    assert store.capture(named).rebuilt
    store.resolve()
    assert store.keys == ("w", "n", "seed.w")


def test_a_sick_capture_is_not_committed_and_names_the_first_bad_key() -> None:
    good = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.float16), "c": torch.ones(2)}
    store = committed_store(good, pin_memory=False)
    lkg = store.last_good_state
    sick = {
        "a": torch.ones(3),
        "b": torch.tensor([1.0, float("inf")], dtype=torch.float16),
        "c": torch.tensor([float("nan"), 1.0]),
    }
    store.capture(sick, meta="sick")
    resolution = store.resolve()
    assert resolution is not None and not resolution.committed and resolution.first_bad == "b"
    assert resolution.report is not None and resolution.report.total_nonfinite == 2
    assert store.last_good_state is lkg and torch.equal(lkg["b"], good["b"])  # type: ignore[index]
    assert store.lkg_meta is None and store.last_resolution is resolution
    assert store.resolve() is None  # nothing pending any more


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("sick_first", [False, True], ids=["sick-second-dtype", "sick-first-dtype"])
def test_a_nan_in_any_float_dtype_makes_the_capture_sick(backend: str, sick_first: bool) -> None:
    # bf16 weights beside fp32 buffers and optimizer state: a store that verified only its first
    # dtype's buffer would commit this capture.
    sick = torch.ones(6, dtype=torch.float32)
    sick[4] = float("nan")
    state = {"w": torch.ones(4, 3, dtype=torch.bfloat16), "b": torch.ones(3, dtype=torch.bfloat16),
             "running_mean": sick, "step": torch.tensor(3)}  # fmt: skip
    if sick_first:
        state = {"running_mean": sick, "w": state["w"], "b": state["b"], "step": state["step"]}
    store = make_store(backend)
    store.capture(state)
    resolution = store.resolve()
    assert resolution is not None and resolution.committed is False
    assert resolution.first_bad == "running_mean" and store.last_good_state is None
    healthy = {**state, "running_mean": torch.ones(6)}
    store.capture(healthy)
    assert store.resolve().committed  # type: ignore[union-attr]


def test_a_rollback_while_a_capture_is_staged_restores_the_previous_lkg() -> None:
    live = {"w": torch.full((4,), 1.0)}
    store = committed_store(live)
    live["w"].fill_(2.0)
    store.capture(live, meta="newer")
    assert store.in_flight
    live["w"].fill_(3.0)
    store.restore(live)
    assert torch.equal(live["w"], torch.full((4,), 1.0)) and not store.in_flight
    assert store.last_resolution is not None and store.lkg_meta is None


def test_last_good_state_is_a_new_dict_per_commit_of_cpu_views() -> None:
    live = {"w": make_tensor((3, 3), torch.float32), "i": make_tensor((2,), torch.int64)}
    store = ReferenceSnapshotStore()
    assert store.last_good_state is None and not store.has_lkg and store.keys == ()
    store.capture(live, meta={"step": 1})
    first = store.last_good_state  # reading resolves the pending capture
    assert first is not None and store.has_lkg and store.lkg_meta == {"step": 1}
    assert store.last_good_state is first
    assert all(t.device.type == "cpu" and not t.requires_grad for t in first.values())
    store.capture(live)
    second = store.last_good_state
    assert second is not first and torch.equal(first["w"], second["w"])  # type: ignore[index]
    # Views over one flat buffer per dtype, not separate copies.
    storage = second["w"].untyped_storage().data_ptr()  # type: ignore[index]
    assert second["w"].data_ptr() == storage  # type: ignore[index]


def test_restore_without_lkg_or_with_a_mismatch_writes_nothing() -> None:
    store = ReferenceSnapshotStore()
    with pytest.raises(RuntimeError, match="no committed"):
        store.restore({"w": torch.ones(2)})
    store = committed_store({"w": torch.ones(2), "v": torch.ones(3)})
    live = {"w": torch.zeros(2), "v": torch.zeros(4)}
    with pytest.raises(SnapshotMismatchError, match="v"):
        store.restore(live)
    assert torch.equal(live["w"], torch.zeros(2))  # nothing half-applied
    with pytest.raises(SnapshotMismatchError, match="float64"):
        store.restore({"w": torch.zeros(2, dtype=torch.float64)})
    result = store.restore({"w": torch.zeros(2), "extra": torch.zeros(1)})
    assert result.missing_keys == ("extra",) and result.unexpected_keys == ("v",)


@pytest.mark.parametrize(
    ("named", "error", "match"),
    [
        ([("w", torch.ones(1)), ("w", torch.ones(1))], ValueError, "duplicate key 'w'"),
        ([("w", [1.0])], TypeError, r"named_tensors\['w'\] must be a torch.Tensor"),
        ([(3, torch.ones(1))], TypeError, "keys must be str"),
        ([("s", torch.eye(2).to_sparse())], ValueError, "strided"),
        (["w"], TypeError, "pairs"),
    ],
)
def test_malformed_input_is_rejected_and_the_lkg_survives(named: list, error: type, match: str) -> None:
    store = committed_store({"w": torch.ones(1)})
    with pytest.raises(error, match=match):
        store.capture(named)
    assert store.has_lkg and not store.in_flight


def test_capture_resolves_a_pending_capture_first() -> None:
    store = ReferenceSnapshotStore()
    store.capture({"w": torch.ones(1)}, meta=1)
    store.capture({"w": torch.full((1,), 2.0)}, meta=2)
    assert store.last_resolution is not None and store.last_resolution.committed and store.lkg_meta == 2


def no_pinned_memory(numel: int, dtype: torch.dtype) -> torch.Tensor:
    raise RuntimeError("pinned memory pool exhausted")


def test_pinning_failure_degrades_to_pageable_and_emits_one_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "_pinned_empty", no_pinned_memory)
    events: list[telemetry.TelemetryEvent] = []
    old = telemetry.set_hub(telemetry.TelemetryHub([telemetry.CallbackSink(events.append)]))
    try:
        store = ReferenceSnapshotStore(pin_memory=True)
        live = {"w": torch.ones(3)}
        for _ in range(3):
            store.capture(live)
            store.resolve()
        store.capture({"w": torch.ones(3), "v": torch.ones(1)})
    finally:
        telemetry.set_hub(old)
    assert [e.event_type for e in events] == [telemetry.TelemetryEventType.SNAPSHOT_DEGRADED]
    assert "exhausted" in events[0].data.reason  # type: ignore[union-attr]
    assert not store.pinned and torch.equal(store.last_good_state["w"], torch.ones(3))  # type: ignore[index]


def test_stream_wait_is_a_no_op_on_cpu_and_close_releases() -> None:
    store = ReferenceSnapshotStore()
    store.capture({"w": torch.ones(1)})
    store.make_stream_wait()
    store.close()
    assert not store.has_lkg and not store.in_flight


def test_make_store_picks_backends_and_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_store("reference"), ReferenceSnapshotStore)
    with pytest.raises(
        ValueError, match=r"snapshot_backend must be one of \('auto', 'native', 'reference'\)"
    ):
        make_store("fast")
    with pytest.raises(TypeError, match="pin_memory"):
        make_store("reference", pin_memory="yes")
    with pytest.raises(ValueError, match="health_backend must be one of"):
        make_store("reference", health_backend="fast")
    assert SNAPSHOT_BACKENDS == ("auto", "native", "reference")
    monkeypatch.setitem(sys.modules, "tolaria.snapshot.native", None)  # the import now fails
    with pytest.raises(RuntimeError, match="'native' is unavailable"):
        make_store("native")
    assert isinstance(make_store("auto"), ReferenceSnapshotStore)


def test_auto_returns_a_working_store() -> None:
    store = make_store("auto", device=torch.device("cpu"))
    assert isinstance(store, SnapshotStore) and store.backend in ("native", "reference")
    live = {"w": make_tensor((5,), torch.float32)}
    expected = live["w"].clone()
    store.capture(live)
    store.resolve()
    live["w"].zero_()
    store.restore(live)
    assert torch.equal(live["w"], expected)


def test_auto_fallback_drops_native_only_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import tolaria.snapshot as snapshot
    from tolaria.snapshot import factory

    def unavailable(**_: object) -> None:
        raise RuntimeError("snapshot backend 'native' is unavailable: test")

    monkeypatch.setattr(factory, "_make_native", unavailable)
    store = snapshot.make_store("auto", double_buffer=False, threads=2, pin_memory=False)
    assert isinstance(store, snapshot.ReferenceSnapshotStore)
    assert store.pin_memory is False
    with pytest.raises(TypeError):
        snapshot.make_store("reference", double_buffer=False)  # asked for by name: no silent drop
