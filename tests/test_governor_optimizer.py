"""Optimizer state travels with the LKG: after a rollback the next update equals a clean run's."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.snapshot import ReferenceSnapshotStore

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
}


def model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(6)]
    return model, data


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    opt.step()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_next_update_after_rollback_equals_a_run_that_never_diverged(name: str) -> None:
    clean_model, data = model_and_data()
    clean_opt = OPTIMIZERS[name](list(clean_model.parameters()))
    for batch in data[:5]:
        train_step(clean_model, clean_opt, batch)
    expected = params_of(clean_model)

    model, _ = model_and_data()
    opt = OPTIMIZERS[name](list(model.parameters()))
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend="reference")
    for batch in data[:4]:
        train_step(model, opt, batch)
    assert gov.snapshot().committed
    for batch in data[:3]:  # diverge: big updates, then a NaN
        train_step(model, opt, (batch[0] * 1e3, batch[1] * 1e3))
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan  # type: ignore[index]
    assert gov.check_health()
    params = list(model.parameters())
    report = gov.execute_rollback()
    assert report.optimizer_state == "restored" and report.panic_reason == "governor_nonfinite_params"
    assert {id(p) for p in opt.state} == {id(p) for p in params}  # the param mapping is kept
    train_step(model, opt, data[4])
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), expected, strict=True))


def test_an_optimizer_first_seen_at_rollback_is_cleared_then_captured() -> None:
    model, data = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gov = TolariaGovernor(model, snapshot_backend="reference")
    for batch in data[:3]:
        train_step(model, opt, batch)
    assert opt.state  # moments and step counts exist
    report = gov.execute_rollback(optimizer=opt)
    assert report.optimizer_state == "cleared" and len(opt.state) == 0
    assert gov.optimizer is opt
    train_step(model, opt, data[3])
    gov.snapshot()
    assert not any(k.startswith("@") for k in gov.last_good_state)  # type: ignore[union-attr]
    step_before = {id(p): float(s["step"]) for p, s in opt.state.items()}
    train_step(model, opt, data[4])
    assert gov.execute_rollback().optimizer_state == "restored"
    assert {id(p): float(s["step"]) for p, s in opt.state.items()} == step_before


def test_without_an_optimizer_nothing_is_touched() -> None:
    model, data = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gov = TolariaGovernor(model, snapshot_backend="reference")
    train_step(model, opt, data[0])
    assert gov.execute_rollback().optimizer_state == "untouched" and opt.state


def test_a_different_optimizer_at_rollback_is_cleared_and_replaces_the_known_one() -> None:
    model, data = model_and_data()
    first = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gov = TolariaGovernor(model, optimizer=first, snapshot_backend="reference")
    second = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, second, data[0])
    assert gov.execute_rollback(optimizer=second).optimizer_state == "cleared"
    assert gov.optimizer is second and not second.state
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        gov.execute_rollback(optimizer="sgd")  # type: ignore[arg-type]


class CountingSGD(torch.optim.SGD):
    """Keeps non-tensor per-parameter state (an int and a list) beside SGD's momentum tensors."""

    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["count"] = state.get("count", 0) + 1
                state["log"] = [*state.get("log", []), state["count"]]
        return super().step(closure)


def test_non_tensor_state_is_restored_as_a_deep_copy() -> None:
    model, data = model_and_data()
    opt = CountingSGD(model.parameters(), lr=0.1, momentum=0.9)
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend="reference")
    train_step(model, opt, data[0])
    gov.snapshot()
    for batch in data[1:3]:
        train_step(model, opt, batch)
    for _ in range(2):
        gov.execute_rollback()
        state = opt.state[model[0].weight]  # type: ignore[index]
        assert state["count"] == 1 and state["log"] == [1]
        state["log"].append(99)  # must not leak into the LKG


def test_sick_optimizer_state_is_not_committed() -> None:
    model, data = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend="reference")
    train_step(model, opt, data[0])
    next(iter(opt.state.values()))["exp_avg_sq"].fill_(math.inf)
    info = gov.snapshot()
    assert info.committed is False and info.first_bad is not None and info.first_bad.startswith("@optimizer/")


def test_the_step_pre_hook_orders_the_step_after_an_in_flight_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(
        ReferenceSnapshotStore, "make_stream_wait", lambda self, stream=None: calls.append(self)
    )
    model, data = model_and_data()
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    gov = TolariaGovernor(model, optimizer=first, snapshot_backend="reference")
    train_step(model, first, data[0])
    assert len(calls) == 1
    second = torch.optim.SGD(model.parameters(), lr=0.1)
    gov.execute_rollback(optimizer=second)
    train_step(model, first, data[1])  # the replaced optimizer's hook is gone
    train_step(model, second, data[1])
    assert len(calls) == 2


def test_the_step_hook_does_not_keep_a_dropped_governors_store_alive() -> None:
    import gc
    import weakref

    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(5):  # e.g. a fresh Governor per episode on one optimizer
        governor = TolariaGovernor(model, optimizer=optimizer, snapshot_backend="reference")
        store = weakref.ref(governor._store)
        del governor
        gc.collect()
        assert store() is None  # its two host copies of the model are freed
    assert len(optimizer._optimizer_step_pre_hooks) == 0  # and no hook piles up
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()  # still steps normally


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_snapshot_from_before_the_first_step_clears_every_moment_and_step(name: str, backend: str) -> None:
    model, data = model_and_data()
    opt = OPTIMIZERS[name](list(model.parameters()))
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend=backend)  # no state captured yet
    for batch in data[:3]:
        train_step(model, opt, batch)
    assert all(opt.state[p] for p in model.parameters())  # moments (and step counts) exist now
    report = gov.execute_rollback()
    # No parameter had captured state, so none keeps any: stale moments with a fresh start
    # would make the next update far too large. The report says so.
    assert report.optimizer_state == "cleared" and report.optimizer_groups == ("cleared",)
    assert len(opt.state) == 0
    fresh_model, _ = model_and_data()
    fresh_opt = OPTIMIZERS[name](list(fresh_model.parameters()))
    train_step(model, opt, data[3])
    train_step(fresh_model, fresh_opt, data[3])
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(fresh_model), strict=True))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_param_group_added_after_the_snapshot_is_reported_cleared_not_restored(backend: str) -> None:
    model, data = model_and_data()
    first, second = list(model[0].parameters()), list(model[2].parameters())  # type: ignore[index]
    opt = torch.optim.Adam(first, lr=1e-2)
    gov = TolariaGovernor(model, optimizer=opt, snapshot_backend=backend)
    train_step(model, opt, data[0])
    assert gov.snapshot().committed
    step_before = {id(p): float(opt.state[p]["step"]) for p in first}
    opt.add_param_group({"params": second})
    for batch in data[1:3]:
        train_step(model, opt, batch)
    report = gov.execute_rollback()
    assert report.optimizer_state == "partial"
    assert report.optimizer_groups == ("restored", "cleared")
    assert {id(p): float(opt.state[p]["step"]) for p in first} == step_before
    assert all(p not in opt.state for p in second)  # the new group's moments are gone, as reported
