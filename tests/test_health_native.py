"""The compiled CPU health pass (tolaria.health.native) against its twin, the pure-PyTorch
reference, and against an element-by-element oracle: every dtype it reads, odd and empty
shapes, non-contiguous and mixed inputs, NaN/+Inf/-Inf at the first, last and a middle
element, and work split over threads (a tensor cut between two threads included)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_health_reference import assert_naive

from tolaria import TolariaGovernor, _ext
from tolaria.backends import health_backend_for
from tolaria.health import check_tensors, reference_check
from tolaria.health.native import DTYPE_CODES, native_check

_C = _ext.require_extension()  # CI sets TOLARIA_REQUIRE_NATIVE=1: a missing build fails, not skips
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Lengths around the pass's 16-element steps and 512-element fp64 folds.
LENGTHS = (0, 1, 7, 15, 16, 17, 511, 512, 513, 4099)


def assert_twins(names: list[str], tensors: list[torch.Tensor], *, threads: int = 0) -> None:
    """native == reference: the same counts and verdict; norms within the reference's fp32
    rounding (which grows with length: 3e-5 at 2M elements), and within 1e-6 of the fp64 norm."""
    ours, theirs = native_check(names, tensors, threads=threads), reference_check(names, tensors)
    assert ours.backend == "native"
    assert (ours.nan, ours.posinf, ours.neginf) == (theirs.nan, theirs.posinf, theirs.neginf)
    assert ours.nonfinite == theirs.nonfinite and ours.first_bad == theirs.first_bad
    for index, (mine, other) in enumerate(zip(ours.norms, theirs.norms, strict=True)):
        if not math.isfinite(other):
            assert not math.isfinite(mine), names[index]
            continue
        wide = tensors[index].detach().to(torch.float64)
        exact = float(torch.linalg.vector_norm(wide)) if wide.numel() else 0.0
        rel = 1e-12 if tensors[index].dtype == torch.float64 else 1e-6
        assert mine == pytest.approx(exact, rel=rel, abs=1e-30), names[index]
        assert mine == pytest.approx(other, rel=1e-4 if rel == 1e-6 else rel, abs=1e-30), names[index]
    if math.isfinite(theirs.global_norm):
        assert ours.global_norm == pytest.approx(theirs.global_norm, rel=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_healthy_tensors_of_odd_lengths_match_the_twin_and_the_oracle(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, generator=generator).to(dtype) for n in LENGTHS]
    tensors += [
        torch.randn(3, 5, 7, generator=generator).to(dtype),
        torch.randn((), generator=generator).to(dtype),
    ]
    names = [f"t{i}" for i in range(len(tensors))]
    report = native_check(names, tensors)
    assert report.healthy and report.names == names
    assert_naive(report, tensors)
    assert_twins(names, tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_element_anywhere_is_found_and_counted(
    dtype: torch.dtype, where: str, value: float
) -> None:
    generator = torch.Generator().manual_seed(2)
    tensors = [torch.randn(n, generator=generator).to(dtype) for n in (33, 1025, 5)]
    sick = tensors[1]
    sick[{"first": 0, "middle": 517, "last": -1}[where]] = value
    names = ["a", "b", "c"]
    report = native_check(names, tensors)
    assert report.first_bad == "b" and report.nonfinite == [0, 1, 0]
    expected = (int(math.isnan(value)), int(value == math.inf), int(value == -math.inf))
    assert (report.nan[1], report.posinf[1], report.neginf[1]) == expected
    assert_naive(report, tensors)
    assert_twins(names, tensors)


def test_non_contiguous_integer_and_fp8_tensors_are_merged_in_input_order() -> None:
    generator = torch.Generator().manual_seed(3)
    strided = torch.randn(30, 20, generator=generator).t()[:, ::3]  # not contiguous: the reference reads it
    strided[1, 2] = -math.inf
    tensors = [
        torch.randn(40, generator=generator),
        strided,
        torch.arange(10),
        torch.ones(3, dtype=torch.bool),
        torch.randn(9, generator=generator).to(torch.float16),
        torch.randn(8, 8, generator=generator).t(),  # transposed, healthy
        torch.tensor([1.0, math.nan]),
    ]
    if hasattr(torch, "float8_e5m2"):
        fp8 = torch.randn(16, generator=generator).to(torch.float8_e5m2)
        fp8[2] = math.inf
        tensors.append(fp8)
    names = [f"t{i}" for i in range(len(tensors))]
    report = native_check(names, tensors)
    assert report.first_bad == "t1"
    assert report.neginf[1] == 1 and report.nan[6] == 1
    assert report.norms[2:4] == pytest.approx([math.sqrt(285), math.sqrt(3)])
    if len(tensors) == 8:
        assert report.posinf[7] == 1
    assert_twins(names, tensors)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_work_split_over_threads_matches_one_thread(threads: int) -> None:
    # 12 MB in all, so the auto split is on too; one tensor large enough to be cut between threads.
    generator = torch.Generator().manual_seed(4)
    tensors = [torch.randn(2_000_003, generator=generator)]
    tensors += [
        torch.randn(n, generator=generator).to(d)
        for n, d in ((1_000_001, torch.float64), (999, torch.bfloat16))
    ]
    tensors += [torch.randn(50_000, generator=generator) for _ in range(7)]
    names = [f"t{i}" for i in range(len(tensors))]
    one = native_check(names, tensors, threads=1)
    split = native_check(names, tensors, threads=threads)
    assert split.norms == pytest.approx(one.norms, rel=1e-9)
    assert_twins(names, tensors, threads=threads)
    # A NaN in the last element of the tensor every thread shares, and one in the middle.
    tensors[0][-1] = math.nan
    tensors[0][1_000_000] = math.inf
    report = native_check(names, tensors, threads=threads)
    assert report.first_bad == "t0" and (report.nan[0], report.posinf[0]) == (1, 1)


def test_half_precision_extremes() -> None:
    half = torch.tensor(
        [6.0e-8, 6.1e-5, 65504.0, -65504.0, 0.0, -0.0], dtype=torch.float16
    )  # subnormal .. max
    brain = torch.tensor(
        [1e-40, 3e38, -1.0], dtype=torch.bfloat16
    )  # a subnormal, and a square that overflows fp32
    report = native_check(["half", "brain"], [half, brain])
    assert_naive(report, [half])
    assert report.healthy  # an fp32 overflow is an infinite norm, never a sick tensor
    assert report.norms[1] == math.inf and reference_check(["brain"], [brain]).norms == [math.inf]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            st.integers(0, 700),
            st.lists(
                st.tuples(st.floats(0, 1), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=3
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_random_inputs_match_the_twin(
    specs: list[tuple[torch.dtype, int, list[tuple[float, float]]]],
) -> None:
    generator = torch.Generator().manual_seed(5)
    tensors = []
    for dtype, length, faults in specs:
        tensor = (torch.randn(length, generator=generator) * 10).to(dtype)
        for position, value in faults:
            if length:
                tensor[min(int(position * length), length - 1)] = value
        tensors.append(tensor)
    assert_twins([f"t{i}" for i in range(len(tensors))], tensors)


def test_dispatch_backend_choice_and_governor() -> None:
    pairs = [("w", torch.ones(4)), ("b", torch.zeros(2))]
    assert check_tensors(pairs).backend == "native"  # auto on CPU, with the extension
    assert check_tensors(pairs, backend="native").norms == [2.0, 0.0]
    assert health_backend_for(torch.device("cpu")).backend == "native"
    model = torch.nn.Linear(3, 2)
    governor = TolariaGovernor(model, health_backend="native")
    assert governor.check_health() is False  # healthy: no panic
    with torch.no_grad():
        model.weight[1, 2] = math.nan
    assert governor.check_health() is True
    assert governor.pending_panic is not None and governor.pending_panic.reason == "governor_nonfinite_params"


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        native_check(["a"], [])
    with pytest.raises(ValueError, match="holds no data"):
        native_check(["m"], [torch.empty(3, device="meta")])
    with pytest.raises(ValueError, match="health_backend='native' checks CPU tensors"):
        TolariaGovernor(torch.nn.Linear(2, 2, device="meta"), health_backend="native")
    with pytest.raises(ValueError, match="differ in length"):
        _C.sum_squares_host([1], [], [0])
    with pytest.raises(ValueError, match=r"dtypes\[0\] = 7 is not a dtype code"):
        _C.sum_squares_host([1], [1], [7])
    with pytest.raises(ValueError, match="tensor address 0 is null"):
        _C.sum_squares_host([0], [4], [0])
    assert _C.sum_squares_host([0], [0], [DTYPE_CODES[torch.float32]]) == [0.0]  # empty: nothing read


def test_without_the_extension_native_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ext, "_extension", None)
    monkeypatch.setattr(_ext, "_unavailable_reason", "not built here")
    with pytest.raises(RuntimeError, match="needs tolaria's compiled extension: not built here"):
        native_check(["a"], [torch.ones(2)])
    assert check_tensors([("a", torch.ones(2))]).backend == "reference"  # auto falls back
    assert health_backend_for(torch.device("cpu")).backend == "reference"


# -- the pass fused into the snapshot copy (CopyPlan.capture_host_checked) ----------------------


def _arena_copy(
    sources: list[torch.Tensor], codes: list[int], threads: int = 0
) -> tuple[list[float], list[torch.Tensor]]:
    """Capture ``sources`` into a fresh arena with the fused pass; the sums and the slots' bytes."""
    sizes = [max(s.nbytes, 1) for s in sources]
    layout = _C.plan_layout(sizes)
    arena = _C.HostArena(layout.chunk_sizes)
    plan = _C.CopyPlan(arena, layout)
    live = [i for i, s in enumerate(sources) if s.nbytes]
    sums = plan.capture_host_checked(
        [sources[i].data_ptr() for i in live], [codes[i] for i in live], threads, live
    )
    chunks = [torch.frombuffer(chunk, dtype=torch.uint8) for chunk in arena.chunks]
    copies = []
    for source, chunk, offset in zip(sources, layout.chunk_index, layout.offsets, strict=True):
        copies.append(chunks[chunk][offset : offset + source.nbytes])
    return sums, copies


@pytest.mark.parametrize("threads", [1, 3])
def test_the_fused_capture_copies_every_byte_and_sums_what_it_wrote(threads: int) -> None:
    generator = torch.Generator().manual_seed(6)
    sources = [torch.randn(n, generator=generator).to(d) for d in DTYPES for n in (1, 17, 513)]
    sources += [
        torch.randn(1_500_001, generator=generator),
        torch.randn(700_001, generator=generator).double(),
    ]
    sources += [torch.arange(7), torch.tensor([True, False, True])]  # raw bytes: copied, not summed
    codes = [DTYPE_CODES.get(s.dtype, -1) for s in sources]
    sums, copies = _arena_copy(sources, codes, threads)
    for source, copy in zip(sources, copies, strict=True):
        assert torch.equal(copy, source.view(-1).view(torch.uint8)), source.dtype
    expected = _C.sum_squares_host(
        [s.data_ptr() for s in sources[:-2]], [s.numel() for s in sources[:-2]], codes[:-2]
    )
    assert sums[:-2] == pytest.approx(expected, rel=1e-9) and sums[-2:] == [0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", [0, 700_000, -1])
def test_the_fused_capture_sees_a_nonfinite_element_anywhere(dtype: torch.dtype, where: int) -> None:
    generator = torch.Generator().manual_seed(7)
    sources = [
        torch.randn(1_400_003, generator=generator).to(dtype),
        torch.randn(9, generator=generator).to(dtype),
    ]
    sources[0][where] = math.nan if where else -math.inf
    sums, _ = _arena_copy(sources, [DTYPE_CODES[dtype]] * 2, threads=2)
    assert not math.isfinite(sums[0]) and math.isfinite(sums[1])


def test_the_fused_capture_refuses_bad_codes_and_partial_elements() -> None:
    layout = _C.plan_layout([6])
    plan = _C.CopyPlan(_C.HostArena(layout.chunk_sizes), layout)
    source = torch.zeros(6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a whole number of its 4-byte elements"):
        plan.capture_host_checked([source.data_ptr()], [0])
    with pytest.raises(ValueError, match="expected 1 dtype codes"):
        plan.capture_host_checked([source.data_ptr()], [])
    with pytest.raises(ValueError, match=r"dtypes\[0\] = 9 is not a dtype code .* -1 raw bytes"):
        plan.capture_host_checked([source.data_ptr()], [9])


def test_a_large_cpu_snapshot_is_verified_in_the_copy_and_a_small_one_by_regions() -> None:
    from tolaria.snapshot.native import NativeSnapshotStore

    big = {"w": torch.randn(1 << 20), "b": torch.randn(3)}  # 4 MiB and a bit: at the threshold
    small = {"w": torch.randn(64), "b": torch.randn(3)}
    assert sum(t.nbytes for t in big.values()) >= NativeSnapshotStore.FUSED_VERIFY_MIN_BYTES
    for state, names in ((big, ["w", "b"]), (small, ["<torch.float32>"])):  # per slot, or per dtype region
        store = NativeSnapshotStore()
        store.capture(state)
        resolution = store.resolve()
        assert resolution.committed and resolution.report.names == names
        assert resolution.report.norms == pytest.approx(
            [float(t.double().norm()) for t in state.values()]
            if len(names) == 2
            else [float(torch.cat(list(state.values())).double().norm())],
            rel=1e-6,
        )


def test_a_governor_snapshot_is_verified_by_the_fused_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    from tolaria.snapshot.native import NativeSnapshotStore

    monkeypatch.setattr(NativeSnapshotStore, "FUSED_VERIFY_MIN_BYTES", 0)  # this tiny model too
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))  # an int64 buffer too
    governor = TolariaGovernor(model)
    assert governor.snapshot().committed
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # finite, but its fp32 squares overflow: not a sick capture
    assert governor.snapshot().committed
    with torch.no_grad():
        model[0].bias[1] = math.nan
    refused = governor.snapshot()  # the LKG stays the one before
    assert not refused.committed and refused.first_bad == "0.bias"
    assert governor.last_good_state is not None
    assert torch.all(governor.last_good_state["0.weight"] == 1e30)
    assert int(governor.last_good_state["1.num_batches_tracked"]) == int(model[1].num_batches_tracked)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no fp8 dtype")
def test_an_fp8_tensor_the_fused_copy_cannot_read_is_still_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    from tolaria.snapshot.native import NativeSnapshotStore

    monkeypatch.setattr(NativeSnapshotStore, "FUSED_VERIFY_MIN_BYTES", 0)
    store = NativeSnapshotStore()
    state = {"w": torch.randn(8), "f8": torch.randn(16).to(torch.float8_e4m3fn)}
    store.capture(state)
    assert store.resolve().committed
    state["f8"][3] = math.nan
    store.capture(state)
    resolution = store.resolve()
    assert not resolution.committed and resolution.first_bad == "f8"
