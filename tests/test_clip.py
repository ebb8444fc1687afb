"""tolaria.clip_grad_norm_: torch's result exactly, and the Governor's gradient check for free.

The function is compared with ``torch.nn.utils.clip_grad_norm_`` on identical copies of the
same gradients (total norm and clipped gradients bit for bit, NaN where torch has NaN); with
``governor=`` the next check_health()/observe() judges the gradients by the norms the clip
computed and reads no gradient itself.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import tolaria
from tolaria import TolariaGovernor, clip_grad_norm_
from tolaria.health import dispatch

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def grads_of(dtype: torch.dtype, poison: str | None = None, where: int = 0) -> list[nn.Parameter]:
    """Five parameters of assorted shapes (one without a gradient), gradients seeded."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (64,), (5, 5, 2), (1,), (33, 4)]
    params = []
    for index, shape in enumerate(shapes):
        p = nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
        if index != 3:
            p.grad = (torch.randn(shape, generator=generator) * 3).to(dtype)
        params.append(p)
    if poison is not None:
        with_grad = [p for p in params if p.grad is not None]
        target = with_grad[where].grad
        assert target is not None
        target.view(-1)[target.numel() // 2] = float(poison)
    return params


def copy_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and ours.device == theirs.device
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


def compare(params: list[nn.Parameter], **kwargs: Any) -> None:
    mine, theirs = copy_params(params), copy_params(params)
    total = clip_grad_norm_(mine, **kwargs)
    expected = torch.nn.utils.clip_grad_norm_(theirs, **kwargs)
    assert_same(total, expected)
    for a, b in zip(mine, theirs, strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None and b.grad is not None:
            assert_same(a.grad, b.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("foreach", [None, False, True])
def test_result_equals_torch(
    dtype: torch.dtype, max_norm: float, norm_type: float, foreach: bool | None
) -> None:
    compare(grads_of(dtype), max_norm=max_norm, norm_type=norm_type, foreach=foreach)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, 1, 3], ids=["first", "middle", "last"])
def test_non_finite_gradients_give_torch_result(dtype: torch.dtype, poison: str, where: int) -> None:
    compare(grads_of(dtype, poison, where), max_norm=1.0)


def test_mixed_dtypes_and_a_single_tensor() -> None:
    params = grads_of(torch.float32) + grads_of(torch.float64)
    compare(params, max_norm=1.0)
    single = grads_of(torch.float32)[0]
    mine, theirs = copy_params([single])[0], copy_params([single])[0]
    assert_same(clip_grad_norm_(mine, 0.1), torch.nn.utils.clip_grad_norm_(theirs, 0.1))
    assert mine.grad is not None and theirs.grad is not None
    assert_same(mine.grad, theirs.grad)


def test_empty_gradients() -> None:
    no_grads = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    assert_same(clip_grad_norm_(no_grads, 1.0), torch.nn.utils.clip_grad_norm_(no_grads, 1.0))
    assert_same(clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    with pytest.warns(UserWarning, match="empty generator"):
        clip_grad_norm_((p for p in []), 1.0)


def test_error_if_nonfinite_raises_like_torch() -> None:
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(grads_of(torch.float32, "nan"), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(grads_of(torch.float32, "nan"), 1.0, error_if_nonfinite=True)


def test_exported() -> None:
    assert tolaria.clip_grad_norm_ is clip_grad_norm_ and "clip_grad_norm_" in tolaria.__all__


# -- the fused path --------------------------------------------------------------------------


def model_with_grads() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer


def backward(model: nn.Module) -> None:
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 6)).square().mean().backward()


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> list[list[torch.Tensor]]:
    """Every tensor list a health check of the Governor reads (blocking and deferred)."""
    seen: list[list[torch.Tensor]] = []
    original = dispatch.check_listed

    def recording(names: Any, tensors: Any, **kwargs: Any) -> Any:
        seen.append(list(tensors))
        return original(names, tensors, **kwargs)

    monkeypatch.setattr(dispatch, "check_listed", recording)
    return seen


def read_gradients(seen: list[list[torch.Tensor]], model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return any(t is g for tensors in seen for t in tensors for g in grads)


@pytest.mark.parametrize("mode", ["check_health", "observe"])
def test_the_governor_does_not_read_the_gradients_again(mode: str, checked: list[list[torch.Tensor]]) -> None:
    model, optimizer = model_with_grads()
    gov = TolariaGovernor(model, optimizer=optimizer)
    for _ in range(3):
        backward(model)
        pre_clip = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        total = clip_grad_norm_(model.parameters(), 1e-3, governor=gov)
        assert_same(total, pre_clip)
        checked.clear()
        assert not (gov.check_health() if mode == "check_health" else gov.observe(1.0))
        assert checked and not read_gradients(checked, model)
        assert any(len(tensors) > 0 for tensors in checked)
        if mode == "check_health":  # the gradient-norm detector saw the unclipped norm
            assert gov.last_grad_norm == pytest.approx(float(pre_clip), rel=1e-6)
        optimizer.step()


def test_without_the_governor_or_after_a_new_backward_the_gradients_are_read(
    checked: list[list[torch.Tensor]],
) -> None:
    model, optimizer = model_with_grads()
    gov = TolariaGovernor(model, optimizer=optimizer)
    backward(model)
    clip_grad_norm_(model.parameters(), 1.0)  # no governor: nothing handed
    gov.check_health()
    assert read_gradients(checked, model)
    checked.clear()
    clip_grad_norm_(model.parameters(), 1.0, governor=gov)
    backward(model)  # new gradient tensors: the handed norms are stale
    gov.check_health()
    assert read_gradients(checked, model)
    checked.clear()
    clip_grad_norm_(model.parameters(), 1.0, governor=gov)
    for p in model.parameters():  # written in place since the clip: stale too
        assert p.grad is not None
        p.grad.mul_(2.0)
    gov.check_health()
    assert read_gradients(checked, model)
    checked.clear()
    clip_grad_norm_(model.parameters(), 1.0, norm_type=1.0, governor=gov)  # not L2: not handed
    gov.check_health()
    assert read_gradients(checked, model)


@pytest.mark.parametrize("where", [0, 2, 3], ids=["first", "middle", "last"])
@pytest.mark.parametrize("mode", ["check_health", "observe"])
def test_a_nan_gradient_panics_through_the_fused_path(where: int, mode: str) -> None:
    model, optimizer = model_with_grads()
    gov = TolariaGovernor(model, optimizer=optimizer)
    backward(model)
    names = [name for name, _ in model.named_parameters()]
    param = dict(model.named_parameters())[names[where]]
    assert param.grad is not None
    with torch.no_grad():
        param.grad.view(-1)[0] = float("nan")
    clip_grad_norm_(model.parameters(), 1.0, governor=gov)
    panicked = gov.check_health() if mode == "check_health" else gov.observe(1.0)
    assert panicked
    panic = gov.pending_panic
    assert panic is not None and panic.reason == "governor_nonfinite_grads"
    assert panic.first_bad == f"{names[where]}.grad"
    report = gov.execute_rollback(optimizer=optimizer)
    assert report.rollback_occurred and report.panic_reason == "governor_nonfinite_grads"


def test_error_if_nonfinite_still_hands_the_sick_norms() -> None:
    model, optimizer = model_with_grads()
    gov = TolariaGovernor(model, optimizer=optimizer)
    backward(model)
    first = next(model.parameters())
    assert first.grad is not None
    first.grad.fill_(float("inf"))
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True, governor=gov)
    assert gov.check_health()
    assert gov.pending_panic is not None and gov.pending_panic.reason == "governor_nonfinite_grads"


def test_a_subset_of_parameters_is_fused_and_the_rest_read() -> None:
    model, optimizer = model_with_grads()
    gov = TolariaGovernor(model, optimizer=optimizer)
    backward(model)
    last = list(model.parameters())[-1]
    assert last.grad is not None
    last.grad.view(-1)[0] = float("nan")  # not clipped: the governor must read it itself
    clip_grad_norm_(list(model.parameters())[:-1], 1.0, governor=gov)
    assert gov.check_health()
    assert gov.pending_panic is not None and gov.pending_panic.first_bad == "2.bias.grad"
