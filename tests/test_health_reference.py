"""The pure-PyTorch reference against an element-by-element oracle, and the public seam."""

from __future__ import annotations

import math

import pytest
import torch

from tolaria import _ext
from tolaria.backends import triton_health, triton_health_error
from tolaria.health import BACKENDS, HealthHandle, HealthReport, check_tensors, reference_check


def naive(tensor: torch.Tensor) -> tuple[int, int, int, float]:
    """NaN, +Inf, -Inf counts and the fp64 norm of the finite-or-not values, one element at a time."""
    values = tensor.detach().to(torch.float64).flatten().tolist() if tensor.numel() else []
    nan = sum(1 for v in values if math.isnan(v))
    posinf = sum(1 for v in values if v == math.inf)
    neginf = sum(1 for v in values if v == -math.inf)
    return (
        nan,
        posinf,
        neginf,
        math.sqrt(math.fsum(v * v for v in values)) if not (nan or posinf or neginf) else math.nan,
    )


def assert_naive(report: HealthReport, tensors: list[torch.Tensor]) -> None:
    for index, tensor in enumerate(tensors):
        nan, posinf, neginf, norm = naive(tensor)
        assert (report.nan[index], report.posinf[index], report.neginf[index]) == (nan, posinf, neginf)
        assert report.nonfinite[index] == nan + posinf + neginf
        if math.isnan(norm):
            assert not math.isfinite(report.norms[index])
        else:
            assert report.norms[index] == pytest.approx(
                norm, rel=1e-3 if tensor.dtype != torch.float64 else 1e-12
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_reference_matches_naive(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=generator).to(dtype) for n in (0, 1, 7, 1025, 4099)]
    tensors[2][3] = math.nan
    tensors[3][0] = math.inf
    tensors[3][-1] = -math.inf
    tensors[4][::100] = math.nan
    tensors.append(torch.randn(30, 20, generator=generator).to(dtype).t()[:, ::3])
    names = [f"t{i}" for i in range(len(tensors))]
    report = reference_check(names, tensors)
    assert_naive(report, tensors)
    assert report.first_bad == "t2" and not report.healthy
    assert report.backend == "reference"


def test_healthy_model_and_global_norm() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    report = check_tensors(model.named_parameters())
    assert report.healthy and report.first_bad is None and report.total_nonfinite == 0
    assert report.names == [name for name, _ in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert report.global_norm == pytest.approx(float(flat.norm()), rel=1e-5)


def test_overflowing_squares_are_counted_not_flagged() -> None:
    big = torch.full((100,), 1e30)  # finite, but its squares overflow fp32
    report = reference_check(["big"], [big])
    assert report.healthy and report.nonfinite == [0]
    assert report.norms == [math.inf]


def test_integer_bool_and_fp8_tensors() -> None:
    tensors = [torch.arange(10), torch.ones(3, dtype=torch.bool), torch.tensor(7, dtype=torch.int64)]
    if hasattr(torch, "float8_e5m2"):
        fp8 = torch.randn(16).to(torch.float8_e5m2)
        fp8[2] = -math.inf
        tensors.append(fp8)
    report = reference_check([str(i) for i in range(len(tensors))], tensors)
    assert report.norms[:3] == pytest.approx([math.sqrt(285), math.sqrt(3), 7.0])
    assert report.nonfinite[:3] == [0, 0, 0]
    if len(tensors) == 4:
        assert report.neginf[3] == 1 and report.first_bad == "3"


def test_empty_input_and_ready_handle() -> None:
    report = check_tensors([])
    assert report.names == [] and report.healthy and report.global_norm == 0.0
    handle = check_tensors([("x", torch.ones(3))], blocking=False)
    assert isinstance(handle, HealthHandle) and handle.ready()
    assert handle.result().norms == [pytest.approx(math.sqrt(3))]


def test_generator_input_and_backends() -> None:
    assert BACKENDS == ("auto", "triton", "native", "reference")
    pairs = [("a", torch.ones(4)), ("b", torch.zeros(2))]
    assert check_tensors(iter(pairs), backend="reference").norms == [2.0, 0.0]
    # auto on CPU: the compiled pass when the extension loaded (CI requires it), else the reference
    assert check_tensors(pairs).backend == ("native" if _ext.extension() is not None else "reference")
    assert triton_health() is not None or triton_health_error()  # importable, or says why not


def test_bad_input_is_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        check_tensors([("a", torch.ones(1))], backend="cuda")
    with pytest.raises(TypeError, match="got a dict; pass its .items()"):
        check_tensors({"a": torch.ones(1)})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must hold \\(name, tensor\\) pairs, got an item of type str"):
        check_tensors([("a", torch.ones(1)), "b"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="'m' is on the meta device and holds no data: materialize"):
        check_tensors([("m", torch.ones(1, device="meta"))])
    with pytest.raises(TypeError, match="'w' is list"):
        check_tensors([("w", [1.0])])
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="one device: 'a' is on cpu, 'm' on meta"):
            check_tensors([("a", torch.ones(1)), ("m", torch.ones(1, device="meta"))], backend=backend)


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from tolaria.health import plan, triton_kernels

    plan.clear_plans()
    monkeypatch.setattr(triton_kernels, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        check_tensors([("x", torch.ones(5))], backend="triton")
