"""The Governor's pre-flight check of a seed-lifecycle mutation.

Before a controller germinates, prunes, re-targets the blend of, fossilizes or advances a seed,
the original esper-lite trainer asks ``governor.preflight_lifecycle_mutation(...)`` whether the
training run is healthy enough for its structure to change, and skips the mutation (recording
WAIT) when the answer is a veto. :func:`preflight_lifecycle_mutation` is that check: pure, with
no side effects, judged on the facts the caller passes in. It never touches the model.

Operations and seed stages are compared by member *name*, so the host application's own enums
(esper's ``LifecycleOp`` and ``SeedStage`` are different classes with the same member names),
tolaria's :class:`~tolaria.morphogenesis.LifecycleOp` / :class:`~tolaria.morphogenesis.SeedStage`
and plain name strings all work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from numbers import Integral, Real
from typing import TypeVar

from tolaria.morphogenesis.stages import LifecycleOp, SeedStage

_T = TypeVar("_T")

#: ``LifecycleMutationVerdict.reason`` of an approval.
REASON_APPROVED = "approved"


@dataclass(frozen=True)
class LifecycleMutationHealthSnapshot:
    """Every input of one pre-flight check, as judged (carried by each verdict, approved or not).

    ``operation`` and ``seed_stage`` are member names (``"GERMINATE"``, ``"TRAINING"``; None stays
    None: an empty slot). ``val_loss`` is in nats, ``val_accuracy`` as the caller measures it (a
    fraction or a percentage), ``alpha_speed_steps`` in steps, ``cooldown_epochs_remaining`` in
    epochs; ``total_params`` and ``effective_seed_params`` count parameter elements.
    """

    operation: str
    slot_id: str
    blueprint_id: str | None
    alpha_target: float | None
    alpha_speed_steps: int | None
    alpha_curve: str | None
    val_loss: float
    val_accuracy: float
    seed_stage: str | None
    total_params: int
    effective_seed_params: float
    max_seeds: int
    active_seed_count: int
    cooldown_epochs_remaining: int
    event_id: str


@dataclass(frozen=True)
class LifecycleMutationVerdict:
    """The Governor's decision on a proposed lifecycle mutation.

    ``approved`` False is a veto: ``blocked_factor`` names the rule that fired (for example
    ``"val_loss_finite"``) and ``reason`` is a sentence naming the operation, the slot and the
    event id. An approval has ``reason == "approved"`` and ``blocked_factor`` None.
    """

    approved: bool
    reason: str
    blocked_factor: str | None = None
    health_snapshot: LifecycleMutationHealthSnapshot | None = None


def preflight_lifecycle_mutation(
    *,
    operation: object,
    slot_id: str,
    blueprint_id: str | None,
    alpha_target: float | None,
    alpha_speed_steps: int | None,
    alpha_curve: object,
    val_loss: float,
    val_accuracy: float,
    seed_stage: object,
    total_params: int,
    effective_seed_params: float,
    max_seeds: int,
    active_seed_count: int,
    cooldown_epochs_remaining: int,
    event_id: str,
) -> LifecycleMutationVerdict:
    """Approve or veto one proposed seed-lifecycle mutation; the first rule that fires wins.

    Rules, in order, with the ``blocked_factor`` each veto carries:

    1. ``val_loss`` is NaN or infinite: ``val_loss_finite``;
    2. ``val_accuracy`` is NaN or infinite: ``val_accuracy_finite``;
    3. ``cooldown_epochs_remaining < 0``: ``cooldown_nonnegative``;
    4. ``max_seeds > 0`` and ``active_seed_count > max_seeds``: ``active_seed_capacity``
       (``max_seeds <= 0`` means no cap);
    5. GERMINATE without a ``blueprint_id``: ``blueprint_present``;
    6. GERMINATE while ``seed_stage`` is not None (None means the slot holds no seed state):
       ``slot_empty_for_germination``;
    7. SET_ALPHA_TARGET without an ``alpha_target``: ``alpha_target_present``;
    8. SET_ALPHA_TARGET or PRUNE without ``alpha_speed_steps`` or ``alpha_curve``:
       ``alpha_schedule_complete``.

    Otherwise the mutation is approved. Every verdict carries the
    :class:`LifecycleMutationHealthSnapshot` of its inputs.

    ``operation`` and ``seed_stage`` may be any enum member with the right name, a name string
    (case-insensitive) or an int value of tolaria's :class:`LifecycleOp` / :class:`SeedStage`;
    ``alpha_curve`` may be an enum member or its name.

    Raises:
        TypeError: naming the argument, when a numeric input is not a real number (ints for the
            counts; bools and tensors are refused: pass ``loss.item()``), or when
            ``operation``/``seed_stage``/``alpha_curve`` is neither a named member nor a str.
        ValueError: an int ``operation``/``seed_stage`` that is not a member's value.
    """
    snapshot = LifecycleMutationHealthSnapshot(
        operation=_member_name("operation", operation, LifecycleOp),
        slot_id=str(slot_id),
        blueprint_id=None if blueprint_id is None else str(blueprint_id),
        alpha_target=_optional(_real, "alpha_target", alpha_target),
        alpha_speed_steps=_optional(_integer, "alpha_speed_steps", alpha_speed_steps),
        alpha_curve=None if alpha_curve is None else _curve_name(alpha_curve),
        val_loss=_real("val_loss", val_loss),
        val_accuracy=_real("val_accuracy", val_accuracy),
        seed_stage=None if seed_stage is None else _member_name("seed_stage", seed_stage, SeedStage),
        total_params=_integer("total_params", total_params),
        effective_seed_params=_real("effective_seed_params", effective_seed_params),
        max_seeds=_integer("max_seeds", max_seeds),
        active_seed_count=_integer("active_seed_count", active_seed_count),
        cooldown_epochs_remaining=_integer("cooldown_epochs_remaining", cooldown_epochs_remaining),
        event_id=str(event_id),
    )
    blocked = _first_veto(snapshot)
    if blocked is None:
        return LifecycleMutationVerdict(
            approved=True, reason=REASON_APPROVED, blocked_factor=None, health_snapshot=snapshot
        )
    factor, why = blocked
    reason = f"{snapshot.operation} of slot {snapshot.slot_id!r} vetoed (event {snapshot.event_id}): {why}"
    return LifecycleMutationVerdict(
        approved=False, reason=reason, blocked_factor=factor, health_snapshot=snapshot
    )


def _first_veto(s: LifecycleMutationHealthSnapshot) -> tuple[str, str] | None:
    """``(blocked_factor, why)`` of the first rule that fires, or None."""
    op = s.operation
    # Health first: with a non-finite validation signal nothing about the model can be judged.
    if not math.isfinite(s.val_loss):
        return "val_loss_finite", f"the validation loss is {s.val_loss}, not finite"
    if not math.isfinite(s.val_accuracy):
        return "val_accuracy_finite", f"the validation accuracy is {s.val_accuracy}, not finite"
    if s.cooldown_epochs_remaining < 0:
        return "cooldown_nonnegative", (
            f"cooldown_epochs_remaining is {s.cooldown_epochs_remaining}; a cooldown cannot be negative"
        )
    if s.max_seeds > 0 and s.active_seed_count > s.max_seeds:
        return "active_seed_capacity", (
            f"{s.active_seed_count} active seeds already exceed max_seeds={s.max_seeds}"
        )
    if op == LifecycleOp.GERMINATE.name:
        if s.blueprint_id is None:
            return "blueprint_present", "germination needs a blueprint_id and none was given"
        if s.seed_stage is not None:
            return "slot_empty_for_germination", (
                f"the slot is not empty (it holds seed state in stage {s.seed_stage})"
            )
    if op == LifecycleOp.SET_ALPHA_TARGET.name and s.alpha_target is None:
        return "alpha_target_present", "setting an alpha target needs an alpha_target and none was given"
    if op in (LifecycleOp.SET_ALPHA_TARGET.name, LifecycleOp.PRUNE.name) and (
        s.alpha_speed_steps is None or s.alpha_curve is None
    ):
        return "alpha_schedule_complete", (
            f"the alpha schedule is incomplete (alpha_speed_steps={s.alpha_speed_steps}, "
            f"alpha_curve={s.alpha_curve})"
        )
    return None


def _member_name(argument: str, value: object, by_value: type[IntEnum]) -> str:
    """The member name of ``value``: an enum member's ``.name``, a str (stripped, upper-cased, so
    ``"germinate"`` cannot slip past the GERMINATE rules) or the name of ``by_value``'s member
    with that int value."""
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(value, str):
        return value.strip().upper()
    if isinstance(value, Integral) and not isinstance(value, bool):
        try:
            return by_value(int(value)).name
        except ValueError:
            valid = ", ".join(f"{m.value} ({m.name})" for m in by_value)
            message = f"{argument}={value!r} is not a {by_value.__name__} value; valid: {valid}"
            raise ValueError(message) from None
    raise TypeError(
        f"{argument} must be an enum member, its name or an int {by_value.__name__} value, "
        f"got {type(value).__name__}"
    )


def _curve_name(value: object) -> str:
    """An alpha curve's name, kept as given (only its presence is judged)."""
    name = getattr(value, "name", value)
    if not isinstance(name, str):
        raise TypeError(f"alpha_curve must be an enum member or its name, got {type(value).__name__}")
    return name


def _real(argument: str, value: object) -> float:
    # bool is a Real to Python, but a True loss is a caller's bug, not a number.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{argument} must be a real number (int or float), got {type(value).__name__}"
            + ("; pass tensor.item()" if type(value).__name__ == "Tensor" else "")
        )
    return float(value)


def _optional(convert: Callable[[str, object], _T], argument: str, value: object) -> _T | None:
    return None if value is None else convert(argument, value)


def _integer(argument: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    return int(value)


__all__ = [
    "REASON_APPROVED",
    "LifecycleMutationHealthSnapshot",
    "LifecycleMutationVerdict",
    "preflight_lifecycle_mutation",
]
