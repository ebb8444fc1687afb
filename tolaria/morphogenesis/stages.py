"""Seed lifecycle: the stages a seed passes through and which moves between them are legal.

A seed is grafted into an empty slot (GERMINATED), trained in isolation (TRAINING), blended
into the host with a rising alpha (BLENDING), held at full strength for evaluation (HOLDING)
and finally made permanent (FOSSILIZED). Any experimental stage may instead be PRUNED; the
slot then sits out an embargo (EMBARGOED), is cleaned (RESETTING) and becomes DORMANT again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any


class SeedStage(IntEnum):
    """Lifecycle stage of a seed. Values match the original substrate's (5 is retired)."""

    UNKNOWN = 0
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    HOLDING = 6
    FOSSILIZED = 7
    PRUNED = 8
    EMBARGOED = 9
    RESETTING = 10


class LifecycleOp(IntEnum):
    """A lifecycle mutation a controller may propose for one slot (the original's action ids).

    The Governor vets each proposal first (:func:`tolaria.lifecycle.preflight_lifecycle_mutation`);
    it compares operations by member name, so a host's own enum with these names works too.
    """

    WAIT = 0
    GERMINATE = 1
    SET_ALPHA_TARGET = 2
    PRUNE = 3
    FOSSILIZE = 4
    ADVANCE = 5


#: Legal moves. FOSSILIZED is terminal: a fossil is part of the host and is never pruned.
VALID_TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    SeedStage.UNKNOWN: frozenset(),
    SeedStage.DORMANT: frozenset({SeedStage.GERMINATED}),
    SeedStage.GERMINATED: frozenset({SeedStage.TRAINING, SeedStage.PRUNED}),
    SeedStage.TRAINING: frozenset({SeedStage.BLENDING, SeedStage.PRUNED}),
    SeedStage.BLENDING: frozenset({SeedStage.HOLDING, SeedStage.PRUNED}),
    SeedStage.HOLDING: frozenset({SeedStage.FOSSILIZED, SeedStage.PRUNED}),
    SeedStage.FOSSILIZED: frozenset(),
    SeedStage.PRUNED: frozenset({SeedStage.EMBARGOED}),
    SeedStage.EMBARGOED: frozenset({SeedStage.RESETTING}),
    SeedStage.RESETTING: frozenset({SeedStage.DORMANT}),
}

#: Stages in which the slot holds a seed module that is still on trial (the Governor's "live" seeds).
EXPERIMENTAL_STAGES: frozenset[SeedStage] = frozenset(
    {SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING}
)
#: Stages in which the slot holds a seed module at all.
SEED_BEARING_STAGES: frozenset[SeedStage] = EXPERIMENTAL_STAGES | {SeedStage.FOSSILIZED}
#: Stages after a prune, before the slot is empty again.
EMBARGO_STAGES: frozenset[SeedStage] = frozenset({SeedStage.PRUNED, SeedStage.EMBARGOED, SeedStage.RESETTING})


def is_valid_transition(source: SeedStage, target: SeedStage) -> bool:
    """True when ``source -> target`` is in :data:`VALID_TRANSITIONS`."""
    return SeedStage(target) in VALID_TRANSITIONS.get(SeedStage(source), frozenset())


def check_transition(source: SeedStage, target: SeedStage) -> None:
    """Raise ValueError naming both stages when ``source -> target`` is not a legal move."""
    source, target = SeedStage(source), SeedStage(target)
    if not is_valid_transition(source, target):
        allowed = sorted(s.name for s in VALID_TRANSITIONS.get(source, frozenset()))
        raise ValueError(
            f"illegal seed transition {source.name} -> {target.name}; "
            f"from {source.name} the allowed targets are {allowed or 'none (terminal stage)'}"
        )


def next_stage(stage: SeedStage) -> SeedStage | None:
    """The forward (non-prune) successor of ``stage``, or None for a terminal or embargo stage."""
    forward = VALID_TRANSITIONS.get(stage, frozenset()) - {SeedStage.PRUNED}
    if stage in EMBARGO_STAGES or len(forward) != 1:
        return None
    return next(iter(forward))


@dataclass
class SeedState:
    """Mutable lifecycle record of the seed in one slot.

    ``epochs_in_stage`` counts :meth:`SeedSlot.step_epoch` calls since the last transition;
    ``epochs_total`` counts them since germination (or since the prune, during an embargo).
    Callers may assign ``stage`` directly (the Governor honours it at the next snapshot).
    """

    stage: SeedStage
    seed_id: str
    blueprint_id: str
    slot_id: str = ""
    epochs_in_stage: int = 0
    epochs_total: int = 0
    prune_reason: str = ""
    prune_initiator: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``stage`` becomes its integer value."""
        data = asdict(self)
        data["stage"] = int(self.stage)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeedState:
        """Inverse of :meth:`to_dict`; unknown keys (from newer versions) are ignored."""
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        known["stage"] = SeedStage(int(known.get("stage", SeedStage.UNKNOWN)))
        return cls(**known)


__all__ = [
    "EMBARGO_STAGES",
    "EXPERIMENTAL_STAGES",
    "SEED_BEARING_STAGES",
    "VALID_TRANSITIONS",
    "LifecycleOp",
    "SeedStage",
    "SeedState",
    "check_transition",
    "is_valid_transition",
    "next_stage",
]
