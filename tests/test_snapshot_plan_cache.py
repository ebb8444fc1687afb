"""The capture plan kept between snapshots (tolaria.snapshot.capture_plan): no state-dict walk
while nothing changed, and every change re-derives it, so snapshots and restores stay exact.

Each change is made between two snapshots; the next capture must equal what the full walk
(``capture_contents``, the oracle) derives, and a rollback must bring back exactly the state
the snapshot saw.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.morphogenesis import MorphogeneticModel, SeedStage
from tolaria.snapshot.entries import capture_contents

BACKENDS = ["native", "reference"]


class WithExtra(nn.Module):
    """A module with extra state (a mutable dict) in its state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.info = {"epoch": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def get_extra_state(self) -> object:
        return dict(self.info)

    def set_extra_state(self, state: Any) -> None:
        self.info = dict(state)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), WithExtra(), nn.Linear(4, 2))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    model.train()
    loss = model(torch.randn(8, 4)).square().mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()


def governor(model: nn.Module, backend: str, optimizer: torch.optim.Optimizer | None = None
             ) -> TolariaGovernor:  # fmt: skip
    return TolariaGovernor(model, optimizer=optimizer, snapshot_backend=backend)


def plan_contents(gov: TolariaGovernor) -> Any:
    return gov._commit.plans.contents(gov.model, gov.optimizer)


def assert_matches_full_walk(gov: TolariaGovernor) -> None:
    """The cached plan's contents are what the full walk derives now: the same keys, the very
    same tensor objects, the same exclusions, extra state and optimizer layout."""
    cached, full = plan_contents(gov), capture_contents(gov.model, gov.optimizer)
    cached_items = list(cached.entries.items()) if isinstance(cached.entries, dict) else cached.entries
    assert [k for k, _ in cached_items] == [k for k, _ in full.entries]
    assert all(a is b for (_, a), (_, b) in zip(cached_items, full.entries, strict=True))
    assert cached.excluded == full.excluded
    assert cached.meta.model_keys == full.meta.model_keys
    assert cached.meta.extras == full.meta.extras
    if full.meta.optimizer is None:
        assert cached.meta.optimizer is None
    else:
        assert cached.meta.optimizer is not None

        def layout(snap: Any) -> list[Any]:
            return [(ref(), {n: e[:2] if e[0] == "tensor" else e for n, e in spec.items()})
                    for ref, spec in snap.per_param]  # fmt: skip

        assert layout(cached.meta.optimizer) == layout(full.meta.optimizer)


def assert_round_trip(gov: TolariaGovernor) -> None:
    """Snapshot, then change every weight, then roll back: the model is exactly as snapshotted,
    and the LKG held exactly the live values."""
    model, optimizer = gov.model, gov.optimizer
    info = gov.snapshot()
    assert info.committed
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()
                if k in set(info.keys_captured) and isinstance(v, torch.Tensor)}  # fmt: skip
    lkg = gov.last_good_state
    assert lkg is not None
    for key, value in expected.items():
        assert lkg[key].dtype == value.dtype and lkg[key].shape == value.shape, key
        assert torch.equal(lkg[key], value), key
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    gov.execute_rollback(optimizer=optimizer)
    live = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(live[key], value), key
    if optimizer is not None and opt_state is not None:
        restored = optimizer.state_dict()["state"]
        for index, state in opt_state["state"].items():
            for name, value in state.items():
                got = restored[index][name]
                assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value


def count_state_dict_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = nn.Module.state_dict

    def counting(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "state_dict", counting)
    return calls


# -- nothing changed: no walk ---------------------------------------------------------------


def planned_governor(backend: str) -> tuple[nn.Module, torch.optim.Optimizer, TolariaGovernor]:
    """A trained model whose Governor has derived its plan (the optimizer state exists now)."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    gov = governor(model, backend, optimizer)
    gov.snapshot()
    return model, optimizer, gov


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_snapshot_with_no_change_does_not_walk_the_state_dict(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, gov = planned_governor(backend)
    calls = count_state_dict_calls(monkeypatch)
    rebuilds = gov._commit.plans.rebuilds
    for _ in range(3):
        train_step(model, optimizer)  # values change, structure does not
        info = gov.snapshot()
        assert info.committed
    assert calls == []  # top-level model.state_dict() would count once per module walked
    assert gov._commit.plans.rebuilds == rebuilds
    monkeypatch.undo()
    assert_matches_full_walk(gov)
    assert_round_trip(gov)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rollback_with_no_change_does_not_walk_the_state_dict_and_stays_exact(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, gov = planned_governor(backend)
    expected = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    calls = count_state_dict_calls(monkeypatch)
    train_step(model, optimizer)
    gov.execute_rollback(optimizer=optimizer)
    assert calls == []  # the restore and the drift check used the kept plan
    monkeypatch.undo()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_extra_state_is_read_at_every_capture() -> None:
    model = make_model()
    gov = governor(model, "native")
    model[2].info["epoch"] = 7  # no structural change: the plan stays, the extra state is new
    rebuilds = gov._commit.plans.rebuilds
    gov.snapshot()
    assert gov._commit.plans.rebuilds == rebuilds
    meta = gov._store.lkg_meta
    assert meta.extras["2._extra_state"] == {"epoch": 7}
    model[2].info["epoch"] = 9
    gov.execute_rollback()
    assert model[2].info == {"epoch": 7}


# -- every change re-derives the plan -------------------------------------------------------

Change = Callable[[nn.Sequential], None]


def _replace_param(m: nn.Sequential) -> None:
    m[0].weight = nn.Parameter(torch.randn(4, 4))


def _write_param_dict(m: nn.Sequential) -> None:
    m[0]._parameters["weight"] = nn.Parameter(torch.randn(4, 4))  # no registration hook fires


def _param_to_none(m: nn.Sequential) -> None:
    m[3].bias = None


def _new_buffer(m: nn.Sequential) -> None:
    m[0].register_buffer("extra", torch.arange(3.0))


def _delete_buffer(m: nn.Sequential) -> None:
    del m[1].num_batches_tracked


def _non_persistent(m: nn.Sequential) -> None:
    m[1].register_buffer("running_var", m[1].running_var, persistent=False)


def _add_module(m: nn.Sequential) -> None:
    m.append(nn.Linear(2, 2))


def _delete_module(m: nn.Sequential) -> None:
    del m[3]


def _replace_module(m: nn.Sequential) -> None:
    m[3] = nn.Linear(4, 2)


def _new_storage(m: nn.Sequential) -> None:
    m[0].weight.data = torch.randn(4, 4)


def _transposed(m: nn.Sequential) -> None:  # the same storage and address, no longer contiguous
    m[0].weight.data = m[0].weight.data.t()


def _new_shape(m: nn.Sequential) -> None:
    m[0].weight.data = torch.randn(4, 6)


def _new_dtype(m: nn.Sequential) -> None:
    m[0].weight.data = m[0].weight.data.double()


def _load_assign(m: nn.Sequential) -> None:
    state = {k: (v.clone() + 1 if v.is_floating_point() else v.clone()) if isinstance(v, torch.Tensor)
             else copy.deepcopy(v) for k, v in m.state_dict().items()}  # fmt: skip
    m.load_state_dict(state, assign=True)


def _state_dict_hook(m: nn.Sequential) -> None:
    def drop_bias(module: nn.Module, state: dict[str, Any], prefix: str, _meta: object) -> None:
        state.pop(prefix + "bias", None)

    m[0]._register_state_dict_hook(drop_bias)


CHANGES: dict[str, Change] = {
    "parameter-replaced": _replace_param,
    "parameter-dict-written": _write_param_dict,
    "parameter-set-to-none": _param_to_none,
    "buffer-registered": _new_buffer,
    "buffer-deleted": _delete_buffer,
    "buffer-made-non-persistent": _non_persistent,
    "module-added": _add_module,
    "module-removed": _delete_module,
    "module-replaced": _replace_module,
    "storage-replaced": _new_storage,
    "transposed-in-place": _transposed,
    "shape-changed": _new_shape,
    "dtype-changed": _new_dtype,
    "load-state-dict-assign": _load_assign,
    "state-dict-hook-added": _state_dict_hook,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_a_model_change_between_snapshots_is_captured_exactly(backend: str, change: str) -> None:
    model = make_model()
    train_step(model, None)
    gov = governor(model, backend)
    gov.snapshot()
    assert_matches_full_walk(gov)
    CHANGES[change](model)
    assert_matches_full_walk(gov)
    assert_round_trip(gov)
    assert_matches_full_walk(gov)  # and the plan derived after the change holds


# -- optimizer changes ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_state_created_by_the_first_step_is_captured(backend: str) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gov = governor(model, backend, optimizer)  # no optimizer state yet
    train_step(model, optimizer)  # Adam creates exp_avg, exp_avg_sq, step
    assert_matches_full_walk(gov)
    assert_round_trip(gov)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_group_added_is_captured(backend: str) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model[0].parameters(), lr=1e-2)
    train_step(model, optimizer)
    gov = governor(model, backend, optimizer)
    optimizer.add_param_group({"params": list(model[3].parameters())})
    train_step(model, optimizer)
    assert_matches_full_walk(gov)
    assert_round_trip(gov)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_tensor_replaced_is_captured(backend: str) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    gov = governor(model, backend, optimizer)
    first = model[0].weight
    optimizer.state[first]["exp_avg"] = torch.full_like(first, 0.25)
    assert_matches_full_walk(gov)
    assert_round_trip(gov)
    assert torch.equal(optimizer.state[first]["exp_avg"], torch.full_like(first, 0.25))


def _replace_state_dict(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    optimizer.state[param] = {key: value.clone() if isinstance(value, torch.Tensor) else value
                              for key, value in optimizer.state[param].items()}  # fmt: skip
    optimizer.state[param]["exp_avg"].fill_(0.5)


def _delete_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    del optimizer.state[param]


def _reorder_states(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    pairs = list(optimizer.state.items())
    optimizer.state.clear()
    optimizer.state.update(reversed(pairs))  # the same mapping, iterated the other way


def _fill_empty_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    # the state dict the plan saw empty (a read of the defaultdict created it) is filled in place
    optimizer.state[param]["momentum_buffer"] = torch.full_like(param, 0.5)


def _swap_states(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    other = next(p for p in optimizer.state if p is not param and p.shape == param.shape)
    state = optimizer.state
    state[param], state[other] = state[other], state[param]  # same keys, values crossed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change",
    [_replace_state_dict, _delete_state, _reorder_states, _swap_states, _fill_empty_state],
    ids=["state-dict-replaced", "state-deleted", "states-reordered", "states-swapped", "empty-state-filled"],
)
def test_a_changed_state_mapping_is_captured(backend: str, change: Callable[..., None]) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    if change is _fill_empty_state:  # an SGD without momentum keeps an empty state dict per parameter
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        for param in model.parameters():
            assert optimizer.state[param] == {}  # the defaultdict creates it
    gov = governor(model, backend, optimizer)
    gov.snapshot()  # the plan is derived and kept
    change(optimizer, model[0].weight)
    assert_matches_full_walk(gov)
    assert_round_trip(gov)


def test_sgd_momentum_buffer_created_later_is_captured() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    train_step(model, optimizer)  # momentum_buffer None
    gov = governor(model, "native", optimizer)
    optimizer.param_groups[0]["momentum"] = 0.9
    train_step(model, optimizer)  # momentum_buffer becomes a tensor
    assert_matches_full_walk(gov)
    assert_round_trip(gov)


# -- seeds ----------------------------------------------------------------------------------


def _seed_model() -> MorphogeneticModel:
    from tolaria.environment import create_model

    torch.manual_seed(0)
    return create_model("cifar10", "cpu", slots=["r0c0", "r0c1"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_lifecycle_changes_re_derive_the_exclusions(backend: str) -> None:
    model = _seed_model()
    gov = governor(model, backend)
    model.germinate_seed("conv_light", slot="r0c0")  # a new live seed: left out
    assert_matches_full_walk(gov)
    assert_round_trip(gov)  # the rollback prunes it
    model.germinate_seed("conv_light", slot="r0c1")
    gov.snapshot()
    while model.get_slot("r0c1").stage != SeedStage.FOSSILIZED:  # stage changes only
        model.advance_seed(slot="r0c1")
        assert_matches_full_walk(gov)
    info = gov.snapshot()
    assert any(k.startswith("seed_slots.r0c1.seed.") for k in info.keys_captured)
    assert_round_trip(gov)


# -- the per-check tensor list of check_health / observe ------------------------------------


def fresh_pairs(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = list(model.named_parameters())
    return params + [(f"{n}.grad", p.grad) for n, p in params if p.grad is not None]


def assert_pairs_fresh(gov: TolariaGovernor) -> None:
    listing = gov._health_listing()
    pairs, n_params = listing.pairs(), listing.n_params
    expected = fresh_pairs(gov.model)
    assert [n for n, _ in pairs] == [n for n, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(pairs, expected, strict=True))
    assert n_params == len(list(gov.model.parameters()))


def test_check_health_lists_the_parameters_once_while_nothing_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_model()
    gov = governor(model, "native")
    train_step(model, None)
    assert not gov.check_health()
    calls: list[int] = []
    original = nn.Module.named_parameters

    def counting(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    params = list(model.parameters())
    monkeypatch.setattr(nn.Module, "named_parameters", counting)
    for _ in range(3):
        for p in params:  # not model.zero_grad(): it lists the parameters itself
            p.grad = None
        train_step(model, None)  # new gradient tensors every step
        assert not gov.check_health()
        assert not gov.observe(1.0)
    assert calls == []
    monkeypatch.undo()
    assert_pairs_fresh(gov)


@pytest.mark.parametrize(
    "change", ["parameter-replaced", "module-added", "module-removed", "parameter-set-to-none"]
)
def test_check_health_follows_model_changes(change: str) -> None:
    model = make_model()
    gov = governor(model, "native")
    train_step(model, None)
    assert_pairs_fresh(gov)
    CHANGES[change](model)
    assert_pairs_fresh(gov)
    model.zero_grad(set_to_none=True)
    assert_pairs_fresh(gov)  # gradients gone
    train_step(model, None)
    assert_pairs_fresh(gov)
    with torch.no_grad():
        next(model.parameters()).grad.fill_(float("nan"))  # type: ignore[union-attr]
    assert gov.check_health()
    assert gov.pending_panic is not None and gov.pending_panic.reason == "governor_nonfinite_grads"


@pytest.mark.parametrize("missing", [(0,), (2,), (0, 3), (1, 2, 3)], ids=lambda m: f"no-grad={m}")
def test_check_health_lists_only_the_gradients_that_exist(missing: tuple[int, ...]) -> None:
    model = make_model()
    gov = governor(model, "native")
    train_step(model, None)
    params = list(model.parameters())
    for index in missing:
        params[index].grad = None
    assert_pairs_fresh(gov)
    with torch.no_grad():  # a NaN in the last gradient that exists is found and named
        last = max(i for i in range(len(params)) if i not in missing)
        params[last].grad.view(-1)[0] = float("nan")  # type: ignore[union-attr]
    assert gov.check_health()
    names = [name for name, _ in model.named_parameters()]
    assert gov.pending_panic is not None and gov.pending_panic.first_bad == f"{names[last]}.grad"


def test_a_buffer_change_relists_nothing_a_snapshot_rederives_it() -> None:
    model = make_model()
    gov = governor(model, "native")
    train_step(model, None)
    gov.check_health()
    listings, plans = gov._checked.rebuilds, gov._commit.plans.rebuilds
    model[0].register_buffer("extra", torch.arange(3.0))  # not a parameter: the check's list holds
    gov.check_health()
    assert gov._checked.rebuilds == listings + 1  # the registration hook bumped the generation
    gov.check_health()
    assert gov._checked.rebuilds == listings + 1  # and then it holds again
    gov.snapshot()
    assert gov._commit.plans.rebuilds == plans + 1  # the capture plan does follow the buffer
    assert_pairs_fresh(gov)
    assert_matches_full_walk(gov)
