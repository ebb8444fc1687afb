"""The optimizer's per-parameter state in a snapshot: what is captured, and how it goes back.

Zeroed Adam moments with a kept step count make the next updates about 3x too large, so the
state is captured as store entries together with the weights and commits atomically with them.
A rollback puts it back and says exactly what it did, per parameter group
(:class:`OptimizerOutcome`): a parameter whose state was captured gets it back; one without
captured state (added after the snapshot, or not stepped yet when it was taken) ends with no
state at all, which the outcome calls "cleared", never "restored".

Sharded optimizer state (FSDP2: the moments are DTensors) is captured as each rank's local
shard, like the weights, and restored into the live DTensor's local shard in place.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tolaria.health.kinds import is_dtensor, local_tensor

#: Keys of optimizer-state tensors in a store; ``@`` never starts a state-dict key.
OPTIMIZER_KEY_PREFIX = "@optimizer/"

#: :attr:`OptimizerOutcome.state` / per-group values.
RESTORED, CLEARED, PARTIAL, UNTOUCHED = "restored", "cleared", "partial", "untouched"


@dataclass(frozen=True)
class ShardLayout:
    """How a DTensor state entry is rebuilt around a fresh local shard: its mesh, placements and
    global shape and stride."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


@dataclass(frozen=True)
class OptimizerSnapshot:
    """The shape of an optimizer's state at capture time: for each parameter (a weak reference,
    so pruned parameters are not kept alive), each state entry is either ``("tensor", key,
    device, layout)`` — the value (a DTensor's local shard when ``layout`` is a
    :class:`ShardLayout`, else the tensor) lives in the store under ``key`` — or ``("value",
    deep copy)``."""

    optimizer: weakref.ref[torch.optim.Optimizer]
    per_param: tuple[tuple[weakref.ref[torch.Tensor], dict[str, tuple[Any, ...]]], ...]


@dataclass(frozen=True)
class OptimizerOutcome:
    """What a rollback did to the optimizer's state. ``groups``: per parameter group,
    "restored" (every parameter got its captured state back), "cleared" (no parameter had
    captured state: all now have none) or "partial" (some of each). ``state`` sums them up the
    same way over the whole optimizer, or is "untouched" when there was no optimizer."""

    state: str
    groups: tuple[str, ...] = ()


def _summary(counts: list[tuple[int, int]]) -> str:
    """"restored"/"cleared"/"partial" of ``(restored, cleared)`` parameter counts."""
    restored = sum(r for r, _ in counts)
    cleared = sum(c for _, c in counts)
    if cleared == 0:
        return RESTORED
    return CLEARED if restored == 0 else PARTIAL


def _layout_of(value: torch.Tensor) -> ShardLayout | None:
    if not is_dtensor(value):
        return None
    return ShardLayout(
        mesh=value.device_mesh,  # type: ignore[attr-defined]
        placements=tuple(value.placements),  # type: ignore[attr-defined]
        shape=value.shape,
        stride=tuple(value.stride()),
    )


def optimizer_entries(
    optimizer: torch.optim.Optimizer | None,
) -> tuple[list[tuple[str, torch.Tensor]], OptimizerSnapshot | None]:
    """The optimizer's per-parameter state as store entries plus its :class:`OptimizerSnapshot`.
    Parameter-group hyperparameters (the learning rate, owned by schedulers) are not captured."""
    if optimizer is None:
        return [], None
    tensors: list[tuple[str, torch.Tensor]] = []
    per_param = []
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            spec: dict[str, tuple[Any, ...]] = {}
            for name, value in (optimizer.state.get(param) or {}).items():
                if isinstance(value, torch.Tensor):
                    key = f"{OPTIMIZER_KEY_PREFIX}{index}/{name}"
                    local = local_tensor(value)
                    tensors.append((key, local))
                    spec[name] = ("tensor", key, local.device, _layout_of(value))
                else:
                    spec[name] = ("value", copy.deepcopy(value))
            per_param.append((weakref.ref(param), spec))
            index += 1
    return tensors, OptimizerSnapshot(weakref.ref(optimizer), tuple(per_param))


def _reusable(
    current: object, kept: torch.Tensor, device: torch.device, sharded: bool
) -> torch.Tensor | None:
    """The live state tensor to write ``kept`` into (a DTensor's local shard), if it fits."""
    if not isinstance(current, torch.Tensor) or is_dtensor(current) != sharded:
        return None
    local = local_tensor(current)
    fits = local.shape == kept.shape and local.dtype == kept.dtype and local.device == device
    return local if fits else None


def _fresh(kept: torch.Tensor, device: torch.device, layout: ShardLayout | None) -> tuple[torch.Tensor, Any]:
    """A new state entry for ``kept``: the tensor the store writes, and the value to install."""
    local = torch.empty(kept.shape, dtype=kept.dtype, device=device)
    if layout is None:
        return local, local
    from torch.distributed.tensor import DTensor

    value = DTensor.from_local(
        local, layout.mesh, layout.placements, run_check=False, shape=layout.shape, stride=layout.stride
    )
    return local, value


def optimizer_restore_plan(
    optimizer: torch.optim.Optimizer | None, snap: OptimizerSnapshot | None, saved: Mapping[str, torch.Tensor]
) -> tuple[list[tuple[str, torch.Tensor]], Callable[[], OptimizerOutcome]]:
    """Plan how to put ``snap`` back into ``optimizer``.

    Returns restore targets for the store (live state tensors reused in place when their shape,
    dtype and device fit, fresh ones otherwise) and a ``finish()`` to call once the store has
    written them: it installs the captured per-parameter state and returns the
    :class:`OptimizerOutcome`. If ``snap`` was not taken of this very optimizer, there are no
    targets and ``finish()`` clears the optimizer's per-parameter state entirely (every group
    "cleared"): stale moments with a stale step count make the next updates far too large.
    Without an optimizer: "untouched".

    Parameters are matched by identity (a rollback keeps Parameter objects), so the mapping of
    state to parameters survives; a parameter without captured state ends with no state.
    """
    if optimizer is None:
        return [], lambda: OptimizerOutcome(UNTOUCHED)
    if snap is None or snap.optimizer() is not optimizer:
        def clear() -> OptimizerOutcome:
            optimizer.state.clear()
            return OptimizerOutcome(CLEARED, (CLEARED,) * len(optimizer.param_groups))

        return [], clear
    captured = {id(ref()): (ref, spec) for ref, spec in snap.per_param if ref() is not None}
    targets: list[tuple[str, torch.Tensor]] = []
    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    counts: list[tuple[int, int]] = []
    for group in optimizer.param_groups:
        group_params: list[torch.Tensor] = group["params"]
        restored = 0
        for param in group_params:
            param_ref, spec = captured.get(id(param), (None, {}))
            if param_ref is None or param_ref() is not param or not spec:
                new_state[param] = {}  # no captured state: it ends with none
                continue
            restored += 1
            live = optimizer.state.get(param) or {}
            state: dict[str, Any] = {}
            for name, entry in spec.items():
                if entry[0] != "tensor":
                    state[name] = copy.deepcopy(entry[1])
                    continue
                key, device, layout = entry[1], entry[2], entry[3]
                kept = saved[key]
                # Reuse a fitting live tensor, so whatever else holds it sees the restored values.
                current = live.get(name)
                target = _reusable(current, kept, device, layout is not None)
                value = current
                if target is None:
                    target, value = _fresh(kept, device, layout)
                targets.append((key, target))
                state[name] = value
            new_state[param] = state
        counts.append((restored, len(group_params) - restored))
    groups = tuple(_summary([c]) for c in counts)
    outcome = OptimizerOutcome(_summary(counts), groups)

    def install() -> OptimizerOutcome:
        for owner, owner_state in new_state.items():
            if owner_state:
                optimizer.state[owner] = owner_state
            else:
                optimizer.state.pop(owner, None)
        return outcome

    return targets, install


def check_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """ValueError naming the group and position of the first optimizer parameter that is not one
    of ``model``'s parameters (matched by identity): its state would be captured and restored
    beside a model it does not belong to."""
    if optimizer is None:
        return
    owned = {id(p) for p in model.parameters()}
    for group_index, group in enumerate(optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            if id(param) not in owned:
                raise ValueError(
                    f"optimizer param group {group_index} holds a parameter (position {position}, shape "
                    f"{tuple(param.shape)}) that is not one of the model's parameters; pass the optimizer "
                    "built from this model's parameters (model.parameters())"
                )


__all__ = [
    "CLEARED",
    "OPTIMIZER_KEY_PREFIX",
    "PARTIAL",
    "RESTORED",
    "UNTOUCHED",
    "OptimizerOutcome",
    "OptimizerSnapshot",
    "ShardLayout",
    "check_optimizer_params",
    "optimizer_entries",
    "optimizer_restore_plan",
]
