"""The fused Triton health kernel against the pure-PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest before tolaria is imported);
the same checks run on CUDA tensors under the ``cuda`` marker on the GPU machine.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable

import pytest
import torch

from tolaria.health import HealthReport, check_tensors, reference_check

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Both accumulate squares in fp32 (fp64 for fp64), in different orders.
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-10}
SIZES = [0, 1, 7, 1023, 1025, 65537]
# Test-sized geometry: blocks of 16 elements, chunks of 4 blocks, so a few hundred elements
# already cross many block and chunk boundaries cheaply in the interpreter.
SMALL = {"block": 16, "chunk_blocks": 4}


def _interpreted() -> bool:
    from tolaria.health import triton_kernels

    return triton_kernels.INTERPRETED


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cpu" and not _interpreted():
        pytest.skip("CPU tensors reach the Triton kernel only under TRITON_INTERPRET=1")
    return request.param


def run_triton(
    pairs: list[tuple[str, torch.Tensor]], *, block: int | None = None, chunk_blocks: int | None = None
) -> HealthReport:
    if block is None and chunk_blocks is None:
        return check_tensors(pairs, backend="triton")
    from tolaria.health import plan

    names, tensors = zip(*pairs, strict=True)
    built = plan.build_plan(tensors, block=block, chunk_blocks=chunk_blocks)
    return built.check(names, tensors).result()


def assert_matches(actual: HealthReport, expected: HealthReport, rel: float) -> None:
    assert actual.backend == "triton"
    assert actual.names == expected.names
    assert actual.nan == expected.nan
    assert actual.posinf == expected.posinf
    assert actual.neginf == expected.neginf
    assert actual.nonfinite == expected.nonfinite
    assert actual.first_bad == expected.first_bad
    for name, got, want in zip(
        actual.names + ["global"],
        actual.norms + [actual.global_norm],
        expected.norms + [expected.global_norm],
        strict=True,
    ):
        if math.isfinite(want):
            assert got == pytest.approx(want, rel=rel, abs=1e-30), name
        else:
            assert (math.isnan(got) and math.isnan(want)) or got == want, name


def check_against_reference(
    pairs: list[tuple[str, torch.Tensor]], rel: float, **geometry: int
) -> HealthReport:
    names, tensors = zip(*pairs, strict=True)
    actual = run_triton(pairs, **geometry)
    assert_matches(actual, reference_check(names, tensors), rel)
    return actual


def randn(numel: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sizes_match_reference(device: str, dtype: torch.dtype, size: int) -> None:
    check_against_reference([("x", randn(size, dtype, device))], REL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_block_and_chunk_boundaries(device: str, dtype: torch.dtype) -> None:
    from tolaria.health import triton_kernels

    block = triton_kernels.block_size(dtype)
    chunk = block * triton_kernels.CHUNK_BLOCKS
    sizes = [block - 1, block, block + 1, chunk - 1, chunk, chunk + 1]
    pairs = [(f"n{n}", randn(n, dtype, device, seed=n)) for n in sizes]
    # A NaN just after each boundary proves every chunk reports into its own tensor.
    pairs[2][1][-1] = math.nan
    pairs[5][1][chunk] = -math.inf
    check_against_reference(pairs, REL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_side_of_small_boundaries(device: str, dtype: torch.dtype) -> None:
    sizes = [n + d for n in (16, 64, 128, 192) for d in (-1, 0, 1)]
    pairs = [(f"n{n}", randn(n, dtype, device, seed=n)) for n in sizes]
    for position, (_, tensor) in enumerate(pairs):
        tensor[(position * 37) % tensor.numel()] = [math.nan, math.inf, -math.inf][position % 3]
    check_against_reference(pairs, REL_TOL[dtype], **SMALL)


# 32767 ends the first fp32 chunk (32768 elements by default), 40001 sits inside a chunk and a
# block, 65536 is alone in the last chunk.
@pytest.mark.parametrize("where", ["first", "chunk_end", "middle", "last"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "posinf", "neginf"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fault_positions(device: str, dtype: torch.dtype, value: float, where: str) -> None:
    sick = randn(65537, dtype, device)
    sick[{"first": 0, "chunk_end": 32767, "middle": 40001, "last": 65536}[where]] = value
    pairs = [
        ("healthy", randn(1025, dtype, device, seed=1)),
        ("sick", sick),
        ("after", randn(7, dtype, device)),
    ]
    report = check_against_reference(pairs, REL_TOL[dtype])
    assert report.first_bad == "sick"
    assert report.nonfinite == [0, 1, 0]


# Finite values whose squares overflow the accumulator: fp32 for fp32/bf16, fp64 for fp64.
HUGE = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float64: 1e200}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", list(HUGE))
def test_overflowing_squares_are_not_sick(device: str, dtype: torch.dtype) -> None:
    huge = HUGE[dtype]
    overflow = torch.full((300,), huge, dtype=dtype, device=device)
    then_nan = randn(300, dtype, device)
    then_nan[:64] = huge  # chunk 0 overflows; the NaN is in chunk 1 (chunks of 64 here)
    then_nan[100] = math.nan
    same_chunk = torch.full((300,), huge, dtype=dtype, device=device)
    same_chunk[10] = math.inf  # an Inf among overflowing squares, then a -Inf in a later chunk
    same_chunk[299] = -math.inf
    pairs = [
        ("overflow", overflow),
        ("then_nan", then_nan),
        ("same_chunk", same_chunk),
        ("healthy", randn(70, dtype, device)),
    ]
    report = check_against_reference(pairs, REL_TOL[dtype], **SMALL)
    assert report.nan == [0, 1, 0, 0] and report.posinf == [0, 0, 1, 0] and report.neginf == [0, 0, 1, 0]
    assert report.norms[0] == math.inf and report.first_bad == "then_nan"
    alone = check_tensors([("overflow", overflow)], backend="triton")  # default geometry
    assert alone.healthy and alone.nonfinite == [0] and alone.norms == [math.inf]


def test_many_faults_counted_exactly(device: str) -> None:
    tensor = randn(3000, torch.float32, device)
    tensor[::7] = math.nan
    tensor[1::11] = math.inf
    tensor[2::13] = -math.inf
    report = check_against_reference([("t", tensor)], 1e-4, **SMALL)
    assert report.nan[0] == int(torch.isnan(tensor).sum())
    assert report.posinf[0] + report.neginf[0] + report.nan[0] == int((~torch.isfinite(tensor)).sum())


@pytest.mark.parametrize("count", [1, 2, 37, 500])
def test_many_tensors_of_mixed_dtypes(device: str, count: int) -> None:
    generator = torch.Generator().manual_seed(count)
    sizes = torch.randint(0, 100, (count,), generator=generator).tolist()
    pairs = []
    for index, size in enumerate(sizes):
        dtype = DTYPES[index % len(DTYPES)]
        tensor = randn(size, dtype, device, seed=index)
        if size and index % 17 == 5:
            tensor[size // 2] = [math.nan, math.inf, -math.inf][index % 3]
        pairs.append((f"t{index}", tensor))
    check_against_reference(pairs, 1e-4, **SMALL)


def test_non_contiguous_views(device: str) -> None:
    base = randn(64 * 48, torch.float32, device).view(64, 48)
    gapped = randn(40 * 40, torch.float32, device).view(40, 40)
    gapped[:, 30:] = math.nan  # outside the view below: must not be counted
    gapped[3, 5] = math.inf
    image = randn(2 * 3 * 8 * 8, torch.float32, device).view(2, 3, 8, 8)
    pairs = [
        ("transposed", base.t()),
        ("gapped", gapped[:, :30]),
        ("strided", base[::3, 1::2]),
        ("expanded", randn(48, torch.float32, device).expand(5, 48)),
        ("unaligned", base.view(-1)[1:]),
        ("channels_last", image.contiguous(memory_format=torch.channels_last)),
        ("scalar", torch.tensor(float("-inf"), device=device)),
        ("half_transposed", randn(300, torch.float16, device).view(20, 15).t()),
        ("double_sliced", randn(500, torch.float64, device)[7:407:2]),
    ]
    report = check_against_reference(pairs, 1e-4, **SMALL)
    assert report.posinf[1] == 1 and report.nan[1] == 0
    assert report.first_bad == "gapped"


def test_integer_and_exotic_tensors(device: str) -> None:
    pairs = [
        ("steps", torch.arange(10, device=device)),
        ("mask", torch.ones(5, dtype=torch.bool, device=device)),
        ("x", randn(100, torch.float32, device)),
    ]
    if hasattr(torch, "float8_e5m2"):
        fp8 = randn(64, torch.float32, device).to(torch.float8_e5m2)
        fp8[3] = math.inf
        pairs.append(("fp8", fp8))
    report = check_against_reference(pairs, 1e-4)
    assert report.nonfinite[:3] == [0, 0, 0]
    assert report.norms[0] == pytest.approx(math.sqrt(sum(i * i for i in range(10))))


def test_bit_identical_twice(device: str) -> None:
    pairs = [(f"t{i}", randn(300 * i + 1, dtype, device, seed=i)) for i, dtype in enumerate(DTYPES * 2)]
    first = run_triton(pairs, **SMALL)
    second = run_triton(pairs, **SMALL)
    assert [x.hex() for x in first.norms] == [x.hex() for x in second.norms]
    assert first.global_norm.hex() == second.global_norm.hex()
    assert run_triton(pairs) == run_triton(pairs)


def test_cache_reused_and_rebuilt_when_a_tensor_is_replaced(device: str) -> None:
    from tolaria.health import plan

    layer = torch.nn.Linear(40, 30).to(device)
    pairs = list(layer.named_parameters())
    tensors = [t for _, t in pairs]
    check_tensors(pairs, backend="triton")
    cached = plan.find_plan(tensors)
    assert cached is not None

    with torch.no_grad():  # in-place writes keep the plan and are seen by the next check
        layer.bias[4] = math.nan
    report = check_tensors(pairs, backend="triton")
    assert plan.find_plan(tensors) is cached
    assert report.first_bad == "bias" and report.nan == [0, 1]

    replacement = torch.full((30, 40), math.inf, device=device)
    layer.weight.data = replacement  # same Parameter object, new storage
    report = check_tensors(pairs, backend="triton")
    new_plan = plan.find_plan(tensors)
    assert new_plan is not None and new_plan is not cached
    assert replacement.data_ptr() in new_plan.table.tolist()
    assert report.posinf == [1200, 0] and report.first_bad == "weight"

    swapped = [("weight", layer.weight), ("bias", torch.zeros(30, device=device))]
    assert check_tensors(swapped, backend="triton").healthy is False
    assert check_tensors([("bias", torch.zeros(30, device=device))], backend="triton").healthy


def test_strided_layout_change_rebuilds(device: str) -> None:
    from tolaria.health import plan

    storage = randn(400, torch.float32, device)
    storage[1] = math.nan
    wide = storage.view(20, 20)[:, ::2]  # element 1 is outside: stride 2 skips it
    assert check_tensors([("v", wide)], backend="triton").healthy
    assert plan.find_plan([wide]) is not None
    odd = storage.as_strided((20, 10), (20, 1))  # same address, bytes and dtype; new strides
    assert plan.find_plan([odd]) is None
    assert check_tensors([("v", odd)], backend="triton").nan == [1]


@pytest.mark.parametrize(
    "make_view",
    [lambda s: s[:4].expand(4, 4), lambda s: s.view(16, 4)[:, 0]],
    ids=["expanded", "every-4th"],
)
def test_a_view_at_a_cached_plans_address_is_read_as_the_view(device: str, make_view: Callable) -> None:
    from tolaria.health import plan

    plan.clear_plans()
    storage = torch.zeros(64, device=device)
    assert check_tensors([("t", storage[:16])], backend="triton").healthy  # read in place at P
    storage[1:4] = math.nan
    storage[5:] = math.inf
    view = make_view(storage)  # at P too, same dtype and byte size, not dense
    assert view.data_ptr() == storage.data_ptr() and view.nbytes == storage[:16].nbytes
    expected = reference_check(["t"], [view])
    assert_matches(check_tensors([("t", view)], backend="triton"), expected, REL_TOL[torch.float32])


def test_a_permuted_dense_tensor_is_read_in_place_only_while_its_layout_holds(device: str) -> None:
    from tolaria.health import plan

    plan.clear_plans()
    storage = randn(40, torch.float32, device)
    transposed = storage[:12].view(3, 4).t()  # dense, not contiguous: read in place
    assert check_tensors([("t", transposed)], backend="triton").healthy
    storage[20] = math.nan  # outside the 12 elements above
    spread = storage.as_strided((4, 3), (1, 10))  # same address, bytes, dtype, contiguity; not dense
    expected = reference_check(["t"], [spread])
    assert expected.nan == [1]
    assert_matches(check_tensors([("t", spread)], backend="triton"), expected, REL_TOL[torch.float32])


def test_non_blocking_handle(device: str) -> None:
    tensor = randn(5000, torch.float32, device)
    tensor[17] = math.nan
    handles = [check_tensors([("t", tensor)], backend="triton", blocking=False) for _ in range(5)]
    for handle in handles:
        report = handle.result()
        assert handle.ready()
        assert report.nan == [1] and report.first_bad == "t"


def test_non_blocking_check_on_cpu_is_ready_at_once() -> None:
    if not _interpreted():
        pytest.skip("CPU tensors reach the Triton kernel only under TRITON_INTERPRET=1")
    tensor = randn(300, torch.float32, "cpu")
    tensor[7] = -math.inf
    handle = check_tensors([("t", tensor)], backend="triton", blocking=False)
    assert handle.ready()
    tensor[7] = 0.0  # the check already ran: a later write does not reach its result
    assert handle.result().neginf == [1] and handle.ready()


def test_same_objects_are_trusted_and_other_objects_compared(device: str) -> None:
    from tolaria.health import plan

    weight, bias = randn(100, torch.float32, device), randn(50, torch.float32, device)
    for _ in range(3):
        assert check_tensors([("w", weight), ("b", bias)], backend="triton").healthy
    built = plan.find_plan([weight, bias])
    assert built is not None and built.trusted() == [0, 1]
    weight[60] = math.nan
    head = weight[:50]  # same address and dtype, another object: its size is compared
    assert plan.find_plan([head, bias]) is None
    assert check_tensors([("w", head), ("b", bias)], backend="triton").healthy  # 60 is outside
    for _ in range(2):  # one plan per address tuple: the full-size set is rebuilt, then trusted
        assert check_tensors([("w", weight), ("b", bias)], backend="triton").nan == [1, 0]
    trusted = plan.find_plan([weight, bias])
    assert trusted is not None and trusted.trusted() == [0, 1]
    del weight, head  # the view kept its base alive
    gc.collect()
    assert trusted.trusted() == [1], "the death of a trusted tensor must end its trust, and only its"

    layer = torch.nn.Linear(8, 4).to(device)
    pairs = list(layer.named_parameters())
    for _ in range(3):
        check_tensors(pairs, backend="triton")
    built = plan.find_plan([t for _, t in pairs])
    assert built is not None and built.trusted() == [0, 1]
    layer.bias.data = torch.zeros(4, device=device)  # same object, its old storage dies
    assert built.trusted() == [0], "a storage swap under a trusted tensor must end the trust"


def test_new_objects_at_trusted_addresses_are_compared_while_the_others_stay_trusted(device: str) -> None:
    from tolaria.health import plan

    params = [randn(64 + i, torch.float32, device) for i in range(3)]
    grads = [torch.zeros_like(p) for p in params]

    def names(count: int) -> list[str]:
        return [f"t{i}" for i in range(count)]

    for _ in range(3):  # built, then the same objects twice: all trusted
        assert check_tensors(list(zip(names(6), params + grads, strict=True)), backend="triton").healthy
    built = plan.find_plan(params + grads)
    assert built is not None and built.trusted() == list(range(6))
    for step in range(3):  # each step new gradient objects over the same memory (CUDA's allocator)
        grads = [g.detach() for g in grads]
        gc.collect()
        assert built.trusted() == [0, 1, 2]
        assert plan.find_plan(params + grads) is built
        grads[1][step] = math.inf
        report = check_tensors(list(zip(names(6), params + grads, strict=True)), backend="triton")
        assert report.posinf == [0, 0, 0, 0, step + 1, 0]
    assert built.trusted() == [0, 1, 2], "an index whose trust ended is compared, not trusted again"
    # a new object of another size at a compared index is refused by this plan
    shorter = [grads[0], grads[1][:10], grads[2]]
    assert plan.find_plan(params + shorter) is None
    # and one at a trusted index while the trusted object lives is compared too
    head = params[0][:10]
    assert plan.find_plan([head, *params[1:], *grads]) is None
    assert built.trusted() == [0, 1, 2]
    # at a compared index, the same memory and size in another layout or dtype is refused
    square = [randn(16, torch.float32, device).reshape(4, 4)]
    square_grads = [torch.zeros_like(square[0])]
    for _ in range(3):
        check_tensors([("w", square[0]), ("w.grad", square_grads[0])], backend="triton")
    other = plan.find_plan(square + square_grads)
    assert other is not None and other.trusted() == [0, 1]
    square_grads = [square_grads[0].detach()]
    gc.collect()
    assert other.trusted() == [0] and plan.find_plan(square + square_grads) is other
    transposed = square_grads[0].t()  # a gradient torch accepts: the parameter's shape, not contiguous
    assert transposed.data_ptr() == square_grads[0].data_ptr() and not transposed.is_contiguous()
    assert plan.find_plan([square[0], transposed]) is None
    assert plan.find_plan([square[0], square_grads[0].view(torch.int32)]) is None


@pytest.mark.cuda
def test_cuda_auto_and_graph_replay_see_new_data() -> None:
    from tolaria.health import plan

    params = [(f"p{i}", torch.randn(1000 + i, device="cuda")) for i in range(20)]
    assert check_tensors(params).backend == "triton"
    for step in range(4):  # build, capture, replays
        with torch.no_grad():
            params[step][1][step] = math.inf
        report = check_tensors(params)
        assert report.posinf == [1 if i <= step else 0 for i in range(20)]
    tensors = [t for _, t in params]
    built = plan.find_plan(tensors)
    assert built is not None
    if plan.graphs_enabled():
        assert built.graph is not None, "graph capture fell back to eager launches"
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        handle = check_tensors(params, blocking=False)
    assert handle.result().posinf[:4] == [1, 1, 1, 1]


@pytest.mark.cuda
def test_cuda_graph_trials_capture_on_one_stream_per_calling_stream() -> None:
    from tolaria.health import plan

    plan.clear_plans()
    plan._CUDA.capture_streams.clear()
    side = torch.cuda.Stream()
    for size in (1000, 2000, 3000):  # three plans, each captured at its first reuse...
        for stream in (torch.cuda.current_stream(), side):  # ...from two calling streams
            with torch.cuda.stream(stream):
                tensors = [(f"p{i}", torch.randn(size + i, device="cuda")) for i in range(3)]
                for _ in range(3):
                    assert check_tensors(tensors, backend="triton").healthy
    streams = plan._CUDA.capture_streams
    assert sorted(key[1] for key in streams) == sorted(
        [torch.cuda.current_stream().cuda_stream, side.cuda_stream]
    )
    assert all(stream.priority < side.priority for stream in streams.values())


@pytest.mark.cuda
def test_cuda_graph_capture_does_not_synchronize() -> None:
    from tolaria.health import plan

    params = [(f"p{i}", torch.randn(1 << 20, device="cuda")) for i in range(8)]
    check_tensors(params)  # build, eager
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # the stream stays busy while the first reuse captures
    handle = check_tensors(params, blocking=False)  # eager + capture + replay + device compare
    assert not handle.ready(), "the first reuse waited for the device"
    assert handle.result().healthy
    check_tensors(params, blocking=False).result()  # the verdict has landed: adopted now
    tensors = [t for _, t in params]
    built = plan.find_plan(tensors)
    assert built is not None
    if plan.graphs_enabled():
        assert built.graph is not None, "graph capture fell back to eager launches"


@pytest.mark.cuda
def test_cuda_non_blocking_does_not_synchronize() -> None:
    params = [(f"p{i}", torch.randn(1 << 20, device="cuda")) for i in range(8)]
    check_tensors(params)  # build
    check_tensors(params)  # first reuse: capture the CUDA graph (compared on the device)
    check_tensors(params)  # adopt it
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # keep the stream busy: the check below must queue behind it
    handle = check_tensors(params, blocking=False)
    assert not handle.ready()
    assert handle.result().healthy
