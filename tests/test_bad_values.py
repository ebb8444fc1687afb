"""Values that used to be accepted (or failed deep inside torch) get a clear error naming the
argument and what is accepted, before anything is changed. Both snapshot stores."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.health import check_tensors

BACKENDS = ["reference", "native"]


def governor(backend: str, **kwargs: object) -> tuple[TolariaGovernor, nn.Linear]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return TolariaGovernor(model, snapshot_backend=backend, **kwargs), model  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_negative_multiplier_is_refused(backend: str) -> None:
    with pytest.raises(ValueError, match=r"multiplier must be a finite real number >= 0, got -1.0"):
        governor(backend, multiplier=-1.0)
    gov, _ = governor(backend)
    with pytest.raises(ValueError, match="multiplier must be"):
        gov.multiplier = -0.5
    assert gov.multiplier == 3.0  # the setting in force is unchanged


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_negative_absolute_threshold_is_refused(backend: str) -> None:
    with pytest.raises(ValueError, match=r"absolute_threshold must be a finite real number >= 0, got -2"):
        governor(backend, absolute_threshold=-2)
    gov, _ = governor(backend)
    with pytest.raises(ValueError, match="absolute_threshold must be"):
        gov.absolute_threshold = -1.0
    assert gov.absolute_threshold == 12.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_negative_death_penalty_is_refused(backend: str) -> None:
    with pytest.raises(ValueError, match=r"death_penalty must be a finite real number >= 0, got -10"):
        governor(backend, death_penalty=-10)
    assert governor(backend, death_penalty=0)[0].get_punishment_reward() == 0.0


@pytest.mark.parametrize("env_id", ["3", 1.5, True, None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_int_env_id_is_refused_before_anything_is_restored(backend: str, env_id: object) -> None:
    gov, model = governor(backend)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    assert gov.check_health()
    with pytest.raises(TypeError, match=f"env_id must be an int, got {type(env_id).__name__}"):
        gov.execute_rollback(env_id=env_id)  # type: ignore[arg-type]
    assert math.isnan(model.weight[0, 0].item())  # nothing was written
    assert gov.pending_panic is not None  # and the panic still waits for a rollback
    assert gov.execute_rollback(env_id=7).env_id == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_optimizer_of_other_parameters_is_refused(backend: str) -> None:
    torch.manual_seed(0)
    model, stranger = nn.Linear(3, 2), nn.Linear(3, 2)
    foreign = torch.optim.SGD(stranger.parameters(), lr=0.1, momentum=0.9)
    refused = r"param group 0 holds a parameter \(position 0, shape \(2, 3\)\) that is not one of the model's"
    with pytest.raises(ValueError, match=refused):
        TolariaGovernor(model, optimizer=foreign, snapshot_backend=backend)
    mixed = torch.optim.SGD([{"params": model.parameters()}, {"params": [stranger.bias]}], lr=0.1)
    with pytest.raises(ValueError, match=r"param group 1 holds a parameter \(position 0, shape \(2,\)\)"):
        TolariaGovernor(model, optimizer=mixed, snapshot_backend=backend)
    gov = TolariaGovernor(model, snapshot_backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(ValueError, match="not one of the model's parameters"):
        gov.execute_rollback(optimizer=foreign)
    assert not torch.equal(model.weight, before[0]) and gov.optimizer is None  # refused before writing
    gov.execute_rollback()
    assert torch.equal(model.weight, before[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_beyond_the_float_range_is_refused(backend: str) -> None:
    gov, _ = governor(backend)
    refused = r"loss must fit a Python float \(\|loss\| <= 1.8e308\), got an int beyond that"
    for check in (gov.check_vital_signs, gov.observe):
        with pytest.raises(ValueError, match=refused):
            check(10**400)
    assert len(gov.loss_history) == 0 and gov.pending_panic is None
    assert gov.check_vital_signs(10**300) is False  # large but representable: judged as usual


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_meta_tensor_loss_is_refused(backend: str) -> None:
    gov, _ = governor(backend)
    loss = torch.tensor(1.0, device="meta")
    for check in (gov.check_vital_signs, gov.observe):
        with pytest.raises(ValueError, match="loss is a tensor on the meta device, which holds no value"):
            check(loss)
    assert len(gov.loss_history) == 0 and gov.pending_verdicts == 0


@pytest.mark.parametrize("deferred", [False, True], ids=["blocking", "deferred"])
@pytest.mark.parametrize(
    "loss", [torch.tensor(True), torch.tensor(1.0 + 0j), torch.ones(2)], ids=["bool", "complex", "two"]
)
def test_a_trainer_hook_refuses_a_loss_that_is_not_one_number(deferred: bool, loss: torch.Tensor) -> None:
    from tolaria.hooks import TrainerHook

    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gov = TolariaGovernor(model, optimizer=optimizer)
    hook = TrainerHook(gov, optimizer, deferred=deferred)
    with pytest.raises(TypeError, match="one-element real tensor"):  # the same in both modes
        hook.begin(loss)
    assert hook.steps_taken == 0 and len(gov.loss_history) == 0


def test_a_dict_where_name_tensor_pairs_are_expected_is_refused() -> None:
    weights = {"weight": torch.ones(2), "bias": torch.ones(1)}
    with pytest.raises(TypeError, match=r"got a dict; pass its .items\(\)"):
        check_tensors(weights)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must hold \(name, tensor\) pairs, got an item of type str"):
        check_tensors(list(weights))  # type: ignore[arg-type]
    assert check_tensors(weights.items()).norms == [pytest.approx(math.sqrt(2)), 1.0]
