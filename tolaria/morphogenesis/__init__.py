"""The seed-slot substrate the Governor protects: stages, slots, blueprints, hosts, models."""

from __future__ import annotations

from tolaria.morphogenesis.blueprints import (
    BLUEPRINTS,
    Blueprint,
    available_blueprints,
    create_seed,
    get_blueprint,
    register_blueprint,
)
from tolaria.morphogenesis.hosts import (
    GPT2_SMALL,
    CNNHost,
    HostNetwork,
    InjectionPoint,
    TransformerConfig,
    TransformerHost,
    slot_id_for,
)
from tolaria.morphogenesis.model import MorphogeneticModel, validate_slots
from tolaria.morphogenesis.slot import AlphaSchedule, SeedSlot, decode_extra_state
from tolaria.morphogenesis.stages import (
    EMBARGO_STAGES,
    EXPERIMENTAL_STAGES,
    SEED_BEARING_STAGES,
    VALID_TRANSITIONS,
    LifecycleOp,
    SeedStage,
    SeedState,
    check_transition,
    is_valid_transition,
    next_stage,
)

__all__ = [
    "BLUEPRINTS",
    "EMBARGO_STAGES",
    "EXPERIMENTAL_STAGES",
    "GPT2_SMALL",
    "SEED_BEARING_STAGES",
    "VALID_TRANSITIONS",
    "AlphaSchedule",
    "Blueprint",
    "CNNHost",
    "HostNetwork",
    "InjectionPoint",
    "LifecycleOp",
    "MorphogeneticModel",
    "SeedSlot",
    "SeedStage",
    "SeedState",
    "TransformerConfig",
    "TransformerHost",
    "available_blueprints",
    "check_transition",
    "create_seed",
    "decode_extra_state",
    "get_blueprint",
    "is_valid_transition",
    "next_stage",
    "register_blueprint",
    "slot_id_for",
    "validate_slots",
]
