"""The seed policy of a snapshot: what of a morphogenetic model is experimental, and what a
rollback does with it.

A model with ``seed_slots`` (slot id → slot with ``.state`` (None or an object with
``.stage``), ``.seed``, ``.alpha_schedule``, ``.prune(reason, *, initiator)``) is snapshotted
without the keys of its non-fossilized slots; a rollback restores the host and fossilized seeds,
then prunes every live seed (a failing prune is reported, never raised), and treats key drift
outside ``seed_slots.`` as an error.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SEED_SLOTS_PREFIX = "seed_slots."

logger = logging.getLogger(__name__)


def is_fossilized(slot: object) -> bool:
    """Whether a seed slot's seed has been made permanent (its stage is ``FOSSILIZED``)."""
    stage = getattr(getattr(slot, "state", None), "stage", None)
    return str(getattr(stage, "name", stage)).upper() == "FOSSILIZED"


def _seed_slots(model: nn.Module) -> list[tuple[Any, Any]]:
    slots: Any = getattr(model, "seed_slots", None)
    return list(slots.items()) if hasattr(slots, "items") else []


def excluded_seed_keys(model: nn.Module) -> Callable[[str], bool]:
    """A predicate for the state-dict keys of every non-fossilized seed slot: its ``seed.`` and
    ``alpha_schedule.`` subtrees and its ``_extra_state``."""
    prefixes, exact = [], set()
    for slot_id, slot in _seed_slots(model):
        if not is_fossilized(slot):
            base = f"{SEED_SLOTS_PREFIX}{slot_id}."
            prefixes += [base + "seed.", base + "alpha_schedule."]
            exact.add(base + "_extra_state")
    starts = tuple(prefixes)
    return lambda key: key in exact or key.startswith(starts)


def raise_on_drift(missing: tuple[str, ...], unexpected: tuple[str, ...]) -> None:
    """RuntimeError when keys outside ``seed_slots.`` are missing or unexpected: architecture
    drift must not pass silently (seed keys come and go with pruning and are fine)."""
    drift_missing = [k for k in missing if not k.startswith(SEED_SLOTS_PREFIX)]
    drift_unexpected = [k for k in unexpected if not k.startswith(SEED_SLOTS_PREFIX)]
    if drift_missing or drift_unexpected:
        raise RuntimeError(
            f"snapshot corruption or architecture drift: keys outside {SEED_SLOTS_PREFIX!r} are missing "
            f"{drift_missing} or unexpected {drift_unexpected}; matching weights were restored and the LKG "
            "is kept"
        )


def raise_on_sick_unsaved_fossils(model: nn.Module, missing: tuple[str, ...]) -> None:
    """RuntimeError when a seed fossilized after the last snapshot holds NaN/Inf weights.

    Its keys were not captured (it was still experimental then), so the rollback cannot restore
    it, and a fossil cannot be pruned: keeping it would make the next step panic again, forever.
    A healthy late fossil is fine (the next snapshot captures it) and passes.
    """
    missing_set = set(missing)
    sick: list[str] = []
    for slot_id, slot in _seed_slots(model):
        seed = getattr(slot, "seed", None)
        if seed is None or not is_fossilized(slot):
            continue
        prefix = f"{SEED_SLOTS_PREFIX}{slot_id}.seed."
        if not any(key.startswith(prefix) for key in missing_set):
            continue
        if any(not bool(torch.isfinite(p).all()) for p in seed.parameters()):
            sick.append(str(slot_id))
    if sick:
        raise RuntimeError(
            f"seed slot(s) {sick} were fossilized after the last committed snapshot and hold non-finite "
            "weights: the Last Known Good has no copy of them and a fossil cannot be pruned; take a "
            "snapshot right after fossilizing a seed (the rest of the model was restored, the LKG is kept)"
        )


def prune_live_seeds(model: nn.Module) -> tuple[str, ...]:
    """Prune every live seed (present and not fossilized; also one whose slot lost its lifecycle
    record) with ``initiator="governor"``; returns the pruned slot ids. A failing prune is
    reported on stderr (the original Governor's words) and in the log, and skipped, never
    raised: one broken seed must not stop the rollback of the others."""
    pruned: list[str] = []
    for slot_id, slot in _seed_slots(model):
        if getattr(slot, "seed", None) is None or is_fossilized(slot):
            continue
        try:
            slot.prune("governor_rollback", initiator="governor")
            pruned.append(str(slot_id))
        except Exception as error:
            print(f"WARNING: Seed prune failed during rollback for slot {slot_id}: {error}", file=sys.stderr)
            logger.exception("pruning seed slot %r after a rollback failed; continuing", slot_id)
    return tuple(pruned)


__all__ = [
    "SEED_SLOTS_PREFIX",
    "excluded_seed_keys",
    "is_fossilized",
    "prune_live_seeds",
    "raise_on_drift",
    "raise_on_sick_unsaved_fossils",
]
