"""The compiled object scans (csrc/object_scan.cpp) against their Python twins.

``same_members`` answers :class:`tolaria.health.structure.ModuleTree`'s "is it still the same
tree?" and ``gradients`` lists the gradients a health check reads. Each change a model can go
through between two steps is made here and both answers are compared, with the expected one;
the registration hooks' generation is bypassed, so the comparison itself is what is tested.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tolaria import _ext
from tolaria.health.pairs import gradients, gradients_in_python
from tolaria.health.structure import ModuleTree

_C = _ext.require_extension()  # CI sets TOLARIA_REQUIRE_NATIVE=1: a missing build fails, not skips


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
    net.register_buffer("scale", torch.ones(1), persistent=False)
    return net


def compiled_answer(tree: ModuleTree) -> bool:
    valued, sized = tree._keys
    return bool(_C.same_members(tree._dicts, valued, sized, tree._values, tree._sizes))


def replace_weight(net: nn.Module) -> None:
    net[0]._parameters["weight"] = nn.Parameter(net[0].weight.detach().clone())  # no hook fires


def replace_buffer(net: nn.Module) -> None:
    net[1]._buffers["running_mean"] = net[1].running_mean.clone()


def add_module(net: nn.Module) -> None:
    net[2]._modules["extra"] = nn.Tanh()


def remove_module(net: nn.Module) -> None:
    del net[2]._modules["1"]


def module_to_none(net: nn.Module) -> None:
    net[2]._modules["1"] = None


def parameter_to_none(net: nn.Module) -> None:
    net[0]._parameters["bias"] = None


def delete_parameter(net: nn.Module) -> None:
    del net[0]._parameters["bias"]


def rename_entry(net: nn.Module) -> None:  # same values, other key, other order: changed
    params = net[0]._parameters
    weight = params.pop("weight")
    params["weight"] = weight


def persistent_flip(net: nn.Module) -> None:
    net._non_persistent_buffers_set.discard("scale")


def state_dict_hook(net: nn.Module) -> None:
    net[1]._register_state_dict_hook(lambda *args: None)


def holder_not_a_dict(net: nn.Module) -> None:
    vars(net[0])["_parameters"] = list(net[0]._parameters.values())


def holder_missing(net: nn.Module) -> None:
    del vars(net[1])["_buffers"]


def sized_not_sized(net: nn.Module) -> None:
    vars(net)["_non_persistent_buffers_set"] = 3


CHANGES: dict[str, tuple[Callable[[nn.Module], None], bool]] = {
    # name: (change, seen by a parameters-only tree)
    "replace_weight": (replace_weight, True),
    "replace_buffer": (replace_buffer, False),
    "add_module": (add_module, True),
    "remove_module": (remove_module, True),
    "module_to_none": (module_to_none, True),
    "parameter_to_none": (parameter_to_none, True),
    "delete_parameter": (delete_parameter, True),
    "persistent_flip": (persistent_flip, False),
    "state_dict_hook": (state_dict_hook, False),
    "holder_not_a_dict": (holder_not_a_dict, True),
    "holder_missing": (holder_missing, False),
    "sized_not_sized": (sized_not_sized, False),
}


@pytest.mark.parametrize("parameters_only", [False, True])
def test_an_untouched_tree_reads_unchanged_in_both(parameters_only: bool) -> None:
    net = model()
    tree = ModuleTree(net, parameters_only=parameters_only)
    net(torch.randn(5, 3)).sum().backward()  # training touches no holder
    assert compiled_answer(tree) and tree.unchanged_in_python() and tree.unchanged(net)


@pytest.mark.parametrize("parameters_only", [False, True])
@pytest.mark.parametrize("name", sorted(CHANGES))
def test_each_change_reads_the_same_in_both(name: str, parameters_only: bool) -> None:
    net = model()
    tree = ModuleTree(net, parameters_only=parameters_only)
    change, seen_by_parameters = CHANGES[name]
    change(net)
    expected = not (seen_by_parameters or not parameters_only)  # True: the change is not watched
    assert compiled_answer(tree) is expected
    assert tree.unchanged_in_python() is expected


def test_recorded_values_or_sizes_of_another_length_read_changed() -> None:
    net = model()
    tree = ModuleTree(net)
    valued, sized = tree._keys
    assert not _C.same_members(tree._dicts, valued, sized, tree._values[:-1], tree._sizes)
    assert not _C.same_members(tree._dicts, valued, sized, (*tree._values, object()), tree._sizes)
    assert not _C.same_members(tree._dicts, valued, sized, tree._values, tree._sizes[:-1])
    assert not _C.same_members(tree._dicts, valued, sized, tree._values, (*tree._sizes, 0))


def test_same_members_names_its_bad_arguments() -> None:
    net = model()
    tree = ModuleTree(net)
    valued, sized = tree._keys
    with pytest.raises(TypeError):
        _C.same_members(list(tree._dicts), valued, sized, tree._values, tree._sizes)
    # A module dict that is not a dict reads as changed, as the twin's lookup fails.
    assert not _C.same_members((object(),), valued, sized, tree._values, tree._sizes)


def parameters(count: int) -> tuple[nn.Parameter, ...]:
    return tuple(nn.Parameter(torch.full((2,), float(i))) for i in range(count))


@pytest.mark.parametrize(
    "missing", [(), (0,), (2,), (4,), (0, 4), (1, 2, 3), (0, 1, 2, 3, 4)], ids=lambda m: f"missing={m}"
)
def test_gradients_match_the_twin(missing: tuple[int, ...]) -> None:
    params = parameters(5)
    for index, param in enumerate(params):
        if index not in missing:
            param.grad = torch.full((2,), float(index) + 0.5)
    ours, theirs = _C.gradients(params), gradients_in_python(params)
    assert ours[1] == theirs[1]
    assert len(ours[0]) == len(theirs[0]) and all(a is b for a, b in zip(ours[0], theirs[0], strict=True))
    assert ours[1] == (None if not missing else [i for i in range(5) if i not in missing])
    assert all(g is p.grad for g, p in zip(ours[0], [p for p in params if p.grad is not None], strict=True))
    assert gradients(params)[1] == ours[1]


def test_gradients_of_nothing_and_bad_arguments() -> None:
    assert _C.gradients(()) == ([], None)
    assert gradients_in_python(()) == ([], None)
    with pytest.raises(TypeError):
        _C.gradients([nn.Parameter(torch.zeros(1))])  # a list, not a tuple
    with pytest.raises(AttributeError):
        _C.gradients((object(),))
    with pytest.raises(AttributeError):
        gradients_in_python((object(),))  # type: ignore[arg-type]


@pytest.mark.parametrize("container", [list, tuple])
def test_untrusted_matches_its_twin_and_updates_the_seen_ids(container: type) -> None:
    from tolaria.health.plan import NOT_TRUSTED, TRUST_ENDED, TRUSTED, untrusted_in_python

    tensors = [torch.zeros(1) for _ in range(6)]
    others = [torch.zeros(1) for _ in range(6)]
    # index: 0 trusted and there, 1 trusted but another object there, 2 trust ended,
    # 3 never trusted and seen last time, 4 never trusted and new, 5 trusted and there
    trusted_ids = [id(tensors[0]), id(tensors[1]), id(tensors[2]), 0, 0, id(tensors[5])]
    state = bytearray([TRUSTED, TRUSTED, TRUST_ENDED, NOT_TRUSTED, NOT_TRUSTED, TRUSTED])
    seen = [0, 0, 0, id(tensors[3]), id(others[4]), 0]
    objects = container([tensors[0], others[1], tensors[2], tensors[3], tensors[4], tensors[5]])
    results = []
    for scan in (_C.untrusted, untrusted_in_python):
        seen_ids = list(seen)
        compare, repeated = scan(objects, list(trusted_ids), bytearray(state), seen_ids)
        results.append((compare, repeated, seen_ids))
    compiled, twin = results
    assert compiled == twin
    compare, repeated, seen_ids = compiled
    assert compare == [1, 2, 3, 4] and repeated == [3]
    assert seen_ids == [0, 0, 0, id(tensors[3]), id(tensors[4]), 0]  # only the new one is recorded
    assert _C.untrusted(container([]), [], bytearray(), []) == ([], [])


def test_untrusted_names_its_bad_arguments() -> None:
    from tolaria.health.plan import untrusted_in_python

    with pytest.raises(TypeError, match="list or a tuple"):
        _C.untrusted(object(), [], bytearray(), [])
    for scan in (_C.untrusted, untrusted_in_python):
        with pytest.raises(ValueError, match="the same length"):
            scan([object()], [0], bytearray(2), [0])
    with pytest.raises(TypeError):
        _C.untrusted([object()], ["not an id"], bytearray([1]), [0])


class _BrokenSize(set):  # type: ignore[type-arg]
    def __len__(self) -> int:
        raise RuntimeError("a container that cannot say its size")


def test_an_error_other_than_a_missing_size_is_raised_by_both() -> None:
    net = model()
    tree = ModuleTree(net)
    vars(net)["_non_persistent_buffers_set"] = _BrokenSize()
    with pytest.raises(RuntimeError, match="cannot say its size"):
        compiled_answer(tree)
    with pytest.raises(RuntimeError, match="cannot say its size"):
        tree.unchanged_in_python()

