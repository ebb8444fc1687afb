"""The loss monitor of the "Vital signs" contract (docs/architecture.md), and the spike detector
it shares with gradient norms."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tolaria.config import SpikeRule, WatchConfig
from tolaria.health import check_tensors
from tolaria.vitals import (
    REASON_DIVERGENCE,
    REASON_GRAD_EXPLOSION,
    REASON_LOBOTOMY,
    REASON_NAN,
    REASON_NONFINITE_GRADS,
    REASON_NONFINITE_PARAMS,
    LossMonitor,
    SpikeDetector,
    coerce_loss,
)
from tolaria.watch import Watch

FAST = settings(max_examples=80, deadline=None)
normal_losses = st.lists(st.floats(0.5, 2.0), min_size=10, max_size=20)


def warmed(values: list[float], **kwargs: object) -> LossMonitor:
    monitor = LossMonitor(WatchConfig(**kwargs))  # type: ignore[arg-type]
    for value in values:
        assert not monitor.check(value).panic
    return monitor


# -- input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss", [3, 2.5, torch.tensor(2.5), torch.tensor([2.5]), torch.tensor([[1]], dtype=torch.int64)]
)
def test_numbers_and_one_element_tensors_are_accepted(loss: object) -> None:
    assert coerce_loss(loss) == float(loss)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("loss", "named"),
    [("2.5", "str"), (None, "NoneType"), (True, "bool"), ([1.0], "list"), (torch.ones(2), r"shape \(2,\)")],
)
def test_anything_else_raises_type_error_naming_the_type(loss: object, named: str) -> None:
    with pytest.raises(TypeError, match=named):
        LossMonitor().check(loss)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="history_window"):
        LossMonitor(WatchConfig(history_window=9))
    with pytest.raises(TypeError, match="history_window"):
        LossMonitor(WatchConfig(history_window=12.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_panics_before_rollback"):
        LossMonitor(WatchConfig(min_panics_before_rollback=0))
    with pytest.raises(TypeError, match="sensitivity"):
        LossMonitor(WatchConfig(sensitivity="high"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="random_guess_loss"):
        LossMonitor(WatchConfig(random_guess_loss=-1.0))


# -- rules -----------------------------------------------------------------------------------
@FAST
@given(losses=st.lists(st.floats(-1e6, 12.0), max_size=60))
def test_never_a_divergence_below_the_absolute_threshold(losses: list[float]) -> None:
    monitor = LossMonitor(WatchConfig(absolute_threshold=12.0))
    for loss in losses:
        assert monitor.check(loss).reason != REASON_DIVERGENCE


@FAST
@given(history=normal_losses, min_panics=st.integers(1, 6), spike=st.floats(1e3, 1e9))
def test_exactly_min_panics_consecutive_anomalies_panic(
    history: list[float], min_panics: int, spike: float
) -> None:
    monitor = warmed(history, min_panics_before_rollback=min_panics)
    for count in range(1, min_panics):
        signs = monitor.check(spike)
        assert not signs.panic and signs.consecutive_panics == count
    signs = monitor.check(spike)
    assert signs.panic and signs.reason == REASON_DIVERGENCE and signs.consecutive_panics == min_panics


@FAST
@given(history=normal_losses, min_panics=st.integers(2, 6), spike=st.floats(1e3, 1e9))
def test_a_normal_sample_clears_the_run(history: list[float], min_panics: int, spike: float) -> None:
    monitor = warmed(history, min_panics_before_rollback=min_panics)
    for _ in range(3):
        for _ in range(min_panics - 1):
            assert not monitor.check(spike).panic
        assert not monitor.check(history[-1]).panic
        assert monitor.consecutive_panics == 0


@FAST
@given(history=normal_losses, spike=st.floats(1e3, 1e9))
def test_anomalies_never_enter_the_history(history: list[float], spike: float) -> None:
    monitor = warmed(history)
    before = list(monitor.history)
    monitor.check(spike)
    assert list(monitor.history) == before


@FAST
@given(
    losses=st.lists(
        st.one_of(st.floats(0.1, 50.0), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=80
    )
)
def test_non_finite_values_never_enter_the_history_and_panic_at_once(losses: list[float]) -> None:
    monitor = LossMonitor()
    for loss in losses:
        signs = monitor.check(torch.tensor(loss, dtype=torch.float64))
        assert all(math.isfinite(v) for v in monitor.history)
        if not math.isfinite(loss):
            assert signs.panic and signs.reason == REASON_NAN


@FAST
@given(first=st.lists(st.floats(0.0, 1e9), max_size=9))
def test_fewer_than_ten_samples_append_and_never_panic(first: list[float]) -> None:
    monitor = LossMonitor()
    for loss in first:
        assert not monitor.check(loss).panic
    assert list(monitor.history) == first


@pytest.mark.parametrize(
    ("loss", "absolute", "multiplier", "panics"),
    [
        # history mean 2, population std 1: mean + 6 std = 8
        (12.0, 12.0, 3.0, False),  # not above the absolute threshold
        (12.5, 12.0, 3.0, True),
        (7.9, 0.0, 3.0, False),  # above 3 x mean, not above mean + 6 std
        (8.1, 0.0, 3.0, True),
        (9.0, 0.0, 5.0, False),  # above mean + 6 std, not above 5 x mean
        (10.5, 0.0, 5.0, True),
    ],
)
def test_divergence_needs_all_three_limits_with_population_std(
    loss: float, absolute: float, multiplier: float, panics: bool
) -> None:
    history = [1.0, 3.0] * 5
    assert statistics.pstdev(history) == 1.0
    monitor = warmed(
        history, min_panics_before_rollback=1, absolute_threshold=absolute, multiplier=multiplier
    )
    signs = monitor.check(loss)
    assert signs.panic is panics and signs.threshold == 8.0
    assert signs.reason == (REASON_DIVERGENCE if panics else None)


def test_lobotomy_panics_at_once_with_ten_samples_only() -> None:
    guess = math.log(10)
    monitor = warmed([0.5] * 9)
    assert not monitor.check(guess).panic  # 9 samples: appended, no panic
    monitor = warmed([0.5] * 10)
    signs = monitor.check(guess + 0.06 * guess)
    assert signs.panic and signs.reason == REASON_LOBOTOMY
    assert not warmed([0.5] * 10).check(guess * 1.07).panic  # outside the 6.5% band
    assert not warmed([1.5] * 10).check(guess).panic  # history mean not below 0.6 x guess
    custom = warmed([0.1] * 10, random_guess_loss=1.0)
    assert custom.check(1.0).reason == REASON_LOBOTOMY


@pytest.mark.parametrize(("mean_fraction", "panics"), [(0.5, True), (0.59, True), (0.61, False)])
def test_lobotomy_mean_bound_is_pinned_on_both_sides_of_0_6(mean_fraction: float, panics: bool) -> None:
    # Between 0.22 (the history above) and 0.6 of the random-guess loss: a 0.3 bound would pass
    # the test above but not this one.
    guess = math.log(10)
    signs = warmed([mean_fraction * guess] * 10).check(guess)
    assert signs.panic is panics and signs.reason == (REASON_LOBOTOMY if panics else None)


@pytest.mark.parametrize(("offset", "panics"), [(-0.06, True), (-0.07, False), (0.06, True), (0.07, False)])
def test_lobotomy_band_is_symmetric_around_the_random_guess_loss(offset: float, panics: bool) -> None:
    guess = math.log(10)
    signs = warmed([0.5] * 10).check(guess * (1 + offset))
    assert signs.panic is panics and signs.reason == (REASON_LOBOTOMY if panics else None)


# -- the shared spike detector (gradient norms) ----------------------------------------------
def test_spike_detector_ignores_nan_and_counts_inf_as_an_anomaly() -> None:
    rule = SpikeRule(sensitivity=6.0, multiplier=3.0, absolute_threshold=0.0, min_consecutive=2)
    spikes = SpikeDetector(rule)
    for value in [1.0] * 10:
        spikes.observe(value)
    assert not spikes.observe(math.nan).anomaly and len(spikes.history) == 10
    verdict = spikes.observe(math.inf)
    assert verdict.anomaly and not verdict.panic
    assert spikes.observe(math.inf).panic
    assert all(math.isfinite(v) for v in spikes.history)


def _report(params: list[torch.Tensor], grads: list[torch.Tensor]):
    pairs = [(f"p{i}", t) for i, t in enumerate(params)] + [(f"p{i}.grad", t) for i, t in enumerate(grads)]
    return check_tensors(pairs, backend="reference")


def test_watch_orders_params_then_grads_then_explosion() -> None:
    ok, nan = torch.ones(3), torch.tensor([1.0, math.nan])
    watch = Watch(WatchConfig(min_panics_before_rollback=1))
    panic = watch.observe_tensors(_report([ok, nan], [nan]), 2)
    assert panic is not None and panic.reason == REASON_NONFINITE_PARAMS and panic.first_bad == "p1"
    panic = watch.observe_tensors(_report([ok, ok], [ok, nan]), 2)
    assert panic is not None and panic.reason == REASON_NONFINITE_GRADS and panic.first_bad == "p1.grad"
    assert len(watch.grad_norms.history) == 0  # sick steps never feed the norm history
    for _ in range(10):
        assert watch.observe_tensors(_report([ok], [ok]), 1) is None
    panic = watch.observe_tensors(_report([ok], [ok * 1e4]), 1)
    assert panic is not None and panic.reason == REASON_GRAD_EXPLOSION
    assert panic.grad_norm == pytest.approx(math.sqrt(3) * 1e4) and watch.pending is panic
    assert watch.observe_tensors(_report([ok], []), 1) is None  # parameters only: no norm to judge


def test_watch_keeps_the_pending_panic_until_cleared() -> None:
    watch = Watch()
    manual, panicked = watch.panic_for_rollback("manual")
    assert not panicked and manual.reason == "manual" and math.isnan(manual.loss)
    panic = watch.observe_loss(math.inf)
    assert panic is not None and watch.panic_for_rollback("manual") == (panic, True)
    watch.clear_panic()
    assert watch.pending is None and watch.loss.consecutive_panics == 0


def test_watch_settings_apply_to_both_monitors_and_are_validated() -> None:
    watch = Watch()
    changed = replace(watch.config, sensitivity=2, min_panics_before_rollback=5, absolute_threshold=1.0)
    watch.configure(changed)
    assert (watch.grad_norms.rule.sensitivity, watch.grad_norms.rule.min_consecutive) == (2.0, 5)
    assert watch.grad_norms.rule.absolute_threshold == 0.0 and watch.config.absolute_threshold == 1.0
    with pytest.raises(ValueError, match="sensitivity"):
        watch.configure(replace(watch.config, sensitivity=-1.0))
    with pytest.raises(TypeError, match="min_panics_before_rollback"):
        watch.configure(replace(watch.config, min_panics_before_rollback=2.5))
