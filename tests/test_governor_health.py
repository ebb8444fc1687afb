"""check_health(): non-finite weights and gradients, and gradient-norm explosions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.telemetry import GovernorPanicPayload, TelemetryEvent


def payloads(hub_events: list[TelemetryEvent]) -> list[GovernorPanicPayload]:
    return [e.data for e in hub_events if isinstance(e.data, GovernorPanicPayload)]


def model_with_grads(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    set_grads(model, scale)
    return model


def set_grads(model: nn.Module, scale: float) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, scale)


def governor(model: nn.Module, **kwargs: object) -> TolariaGovernor:
    return TolariaGovernor(model, snapshot_backend="reference", health_backend="reference", **kwargs)  # type: ignore[arg-type]


def test_a_healthy_model_does_not_panic(events: list[TelemetryEvent]) -> None:
    gov = governor(model_with_grads())
    assert gov.check_health() is False
    assert payloads(events) == []


def test_non_finite_weights_panic_and_name_the_first_sick_tensor(events: list[TelemetryEvent]) -> None:
    model = model_with_grads()
    gov = governor(model)
    with torch.no_grad():
        model[1].bias[0] = math.inf  # type: ignore[index]
        model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]  # params win over grads
    assert gov.check_health() is True
    (payload,) = payloads(events)
    assert payload.reason == "governor_nonfinite_params" and payload.first_bad == "1.bias"
    report = gov.execute_rollback()
    assert report.reason == "Structural Collapse" and report.panic_reason == "governor_nonfinite_params"
    assert math.isnan(report.loss_at_panic) and torch.isfinite(model[1].bias).all()  # type: ignore[index]


def test_non_finite_gradients_panic_naming_the_gradient(events: list[TelemetryEvent]) -> None:
    model = model_with_grads()
    gov = governor(model)
    model[1].weight.grad[1, 2] = -math.inf  # type: ignore[index]
    assert gov.check_health() is True
    (payload,) = payloads(events)
    assert payload.reason == "governor_nonfinite_grads" and payload.first_bad == "1.weight.grad"
    assert gov.execute_rollback().panic_reason == "governor_nonfinite_grads"


def test_checks_can_be_switched_off() -> None:
    model = model_with_grads()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan  # type: ignore[index]
    gov = governor(model, check_parameters=False)
    gov_grads_off = governor(model_with_grads(), check_gradients=False)
    assert gov.check_health() is False  # the NaN weight is not inspected
    gov_grads_off.model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
    assert gov_grads_off.check_health() is False
    assert (
        governor(nn.Sequential(nn.Linear(2, 2)), check_parameters=False).check_health() is False
    )  # no grads


def test_grad_explosion_needs_consecutive_anomalies(events: list[TelemetryEvent]) -> None:
    model = model_with_grads()
    gov = governor(model, min_panics_before_rollback=2)
    for step in range(12):
        set_grads(model, 1.0 + 0.01 * step)
        assert gov.check_health() is False
    set_grads(model, 1e3)
    assert gov.check_health() is False  # one anomaly
    set_grads(model, 1.0)
    assert gov.check_health() is False  # a normal norm clears the run
    set_grads(model, 1e3)
    assert gov.check_health() is False
    assert gov.check_health() is True  # second in a row
    (payload,) = payloads(events)
    assert payload.reason == "governor_grad_explosion" and payload.consecutive_panics == 2
    assert payload.grad_norm == pytest.approx(1e3 * math.sqrt(sum(p.numel() for p in model.parameters())))
    assert math.isfinite(payload.loss_threshold) and payload.first_bad is None
    assert gov.execute_rollback().panic_reason == "governor_grad_explosion"


def test_non_finite_gradients_never_enter_the_grad_norm_history() -> None:
    model = model_with_grads()
    gov = governor(model, min_panics_before_rollback=1)
    for _ in range(10):
        assert gov.check_health() is False
    model[0].bias.grad[0] = math.nan  # type: ignore[index]
    assert gov.check_health() is True
    set_grads(model, 1.0)
    assert gov.check_health() is False  # the statistics were not poisoned by the NaN step
    set_grads(model, 50.0)
    assert gov.check_health() is True


def test_loss_and_health_panics_share_one_pending_reason() -> None:
    model = model_with_grads()
    gov = governor(model)
    assert gov.check_vital_signs(math.nan)
    model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
    assert gov.check_health()
    report = gov.execute_rollback()
    assert report.panic_reason == "governor_nonfinite_grads"  # the latest panic is what is reported
    assert gov.consecutive_panics == 0


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_finite_gradients_whose_norm_overflows_count_as_explosions_during_warm_up(backend: str) -> None:
    # 1e30 is a finite fp32 value, but its square is not: the global norm comes out +inf. While
    # the norm history is still warming up, +inf is not statistics but it is never normal either.
    model = model_with_grads(1e30)
    gov = TolariaGovernor(model, snapshot_backend=backend, min_panics_before_rollback=3)
    verdicts = [gov.check_health() for _ in range(3)]
    assert verdicts == [False, False, True]
    assert gov.last_grad_norm == math.inf
    assert gov.pending_panic is not None and gov.pending_panic.reason == "governor_grad_explosion"
    assert gov.pending_panic.first_bad is None  # no element is non-finite
    assert len(gov._watch.grad_norms.history) == 0  # the infinite norm entered no history
    set_grads(model, 1.0)
    gov.execute_rollback()
    assert gov.check_health() is False and len(gov._watch.grad_norms.history) == 1


def test_a_backend_name_set_on_the_governor_later_is_still_checked() -> None:
    from tolaria.health import dispatch

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    gov = TolariaGovernor(net)
    net(torch.randn(5, 3)).sum().backward()
    gov.health_backend = "Triton"  # a typo after construction: refused at the check, not ignored
    with pytest.raises(ValueError, match="backend must be one of"):
        gov.check_health()
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.check_listed(["t"], [torch.zeros(1)], backend="fast")
