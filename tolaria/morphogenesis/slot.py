"""SeedSlot: one injection point of a host, and the lifecycle of the seed grafted there.

State-dict layout (the Governor relies on it): the seed's tensors live under ``seed.``, the
blend ramp's under ``alpha_schedule.``, and the lifecycle under ``_extra_state``; the slot
owns nothing else that is persistent. The lifecycle is a small dict of plain values (stage
as an int), so it deep-copies cheaply and survives JSON; snapshot stores keep it beside the
tensors and hand it back through ``set_extra_state``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tolaria.constants import DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE
from tolaria.morphogenesis.blueprints import HostKind, create_seed, get_blueprint
from tolaria.morphogenesis.stages import (
    EXPERIMENTAL_STAGES,
    SEED_BEARING_STAGES,
    SeedStage,
    SeedState,
    check_transition,
    next_stage,
)

logger = logging.getLogger(__name__)

_EXTRA_STATE_VERSION = 1
DEFAULT_BLEND_EPOCHS = 3
DEFAULT_MIN_EPOCHS_IN_STAGE = 1


class AlphaSchedule(nn.Module):
    """Linear blend ramp: alpha = epochs_done / total_epochs, clamped to [0, 1].

    Both counters are 0-d float32 buffers so they travel with the state dict, and
    :meth:`alpha_tensor` lets forward use alpha without a host synchronisation.
    """

    epochs_done: torch.Tensor
    total_epochs: torch.Tensor

    def __init__(self, total_epochs: int = DEFAULT_BLEND_EPOCHS) -> None:
        super().__init__()
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        self.register_buffer("epochs_done", torch.zeros(()))
        self.register_buffer("total_epochs", torch.tensor(float(total_epochs)))

    def step(self) -> None:
        """Advance the ramp by one epoch."""
        self.epochs_done.add_(1.0)

    def alpha_tensor(self) -> torch.Tensor:
        """Current alpha as a 0-d tensor on the schedule's device."""
        return (self.epochs_done / self.total_epochs).clamp(0.0, 1.0)

    @property
    def alpha(self) -> float:
        """Current alpha as a Python float (synchronises with the device)."""
        return float(self.alpha_tensor())

    @property
    def complete(self) -> bool:
        """True once the ramp has reached 1."""
        return self.alpha >= 1.0


class SeedSlot(nn.Module):
    """An injection point that can host one seed: ``forward(h) = h + alpha · seed(h)``.

    Args:
        slot_id: the host's name for this point (``r0c0``, ``r0c1``, ...).
        dim: feature size at this point (channels for CNNs, d_model for transformers).
        kind: ``"cnn"`` or ``"transformer"``; selects which blueprints fit.
        seed_options: extra integers handed to blueprint factories (``n_heads`` ...).
        permissive_gates: when False, :meth:`advance_stage` also enforces quality gates
            (minimum epochs in TRAINING and HOLDING, a finished blend before HOLDING).
        embargo_epochs: epochs a pruned slot stays PRUNED/EMBARGOED before it is empty again.
        blend_epochs: length of the BLENDING ramp in epochs.

    Per stage, the seed's contribution to forward: GERMINATED none; TRAINING none to the
    output value, but the seed receives the task gradient (straight-through) on a detached
    copy of the host features, so it learns without disturbing the host; BLENDING
    ``alpha``; HOLDING and FOSSILIZED full.
    """

    seed: nn.Module | None
    alpha_schedule: AlphaSchedule | None
    _anchor: torch.Tensor

    def __init__(
        self,
        slot_id: str,
        dim: int,
        kind: HostKind,
        *,
        seed_options: Mapping[str, int] | None = None,
        permissive_gates: bool = True,
        embargo_epochs: int = DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE,
        blend_epochs: int = DEFAULT_BLEND_EPOCHS,
        min_epochs_in_stage: int = DEFAULT_MIN_EPOCHS_IN_STAGE,
    ) -> None:
        super().__init__()
        if embargo_epochs < 0:
            raise ValueError(f"embargo_epochs must be >= 0, got {embargo_epochs}")
        if blend_epochs < 1:
            raise ValueError(f"blend_epochs must be >= 1, got {blend_epochs}")
        self.slot_id = slot_id
        self.dim = dim
        self.kind: HostKind = kind
        self.seed_options = dict(seed_options or {})
        self.permissive_gates = permissive_gates
        self.embargo_epochs = embargo_epochs
        self.blend_epochs = blend_epochs
        self.min_epochs_in_stage = min_epochs_in_stage
        self.state: SeedState | None = None
        self.register_module("seed", None)
        self.register_module("alpha_schedule", None)
        # Non-persistent, so absent from the state dict: it only remembers where .to() put
        # the slot, so seeds created later (germination, restore) land on the same device/dtype.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self._seed_blueprint: str | None = None
        self._germinations = 0

    # ----------------------------------------------------------------- properties
    @property
    def stage(self) -> SeedStage:
        """The seed's stage; DORMANT for an empty slot."""
        return self.state.stage if self.state is not None else SeedStage.DORMANT

    @property
    def is_active(self) -> bool:
        """True while the slot holds a seed (GERMINATED through FOSSILIZED)."""
        return self.seed is not None and self.state is not None and self.state.stage in SEED_BEARING_STAGES

    @property
    def alpha(self) -> float:
        """Weight of the seed's output in the forward value (0 while it is not contributing)."""
        if self.seed is None:
            return 0.0
        stage = self.stage
        if stage in (SeedStage.HOLDING, SeedStage.FOSSILIZED):
            return 1.0
        if stage == SeedStage.BLENDING and self.alpha_schedule is not None:
            return self.alpha_schedule.alpha
        return 0.0

    # ----------------------------------------------------------------- lifecycle
    def germinate(self, blueprint_id: str, seed_id: str | None = None) -> SeedState:
        """Graft a fresh seed of ``blueprint_id`` into this (empty) slot; returns its state.

        Raises ValueError for an unknown or incompatible blueprint, or when the slot is not
        empty (naming the illegal transition, e.g. ``EMBARGOED -> GERMINATED``).
        """
        get_blueprint(blueprint_id, self.kind)
        if self.state is not None and self.state.stage != SeedStage.DORMANT:
            check_transition(self.state.stage, SeedStage.GERMINATED)
        self._germinations += 1
        self._set_seed(blueprint_id)
        self._set_schedule(False)
        self.state = SeedState(
            stage=SeedStage.GERMINATED,
            seed_id=seed_id or f"{self.slot_id}-{blueprint_id}-{self._germinations}",
            blueprint_id=blueprint_id,
            slot_id=self.slot_id,
        )
        return self.state

    def advance_stage(self, target: SeedStage | None = None) -> bool:
        """Move the seed to ``target`` (default: the next forward stage).

        Returns True when the move happened, False when a quality gate held it back (only
        with ``permissive_gates=False``). Raises ValueError naming both stages for an
        illegal move, including any move out of an empty slot or out of FOSSILIZED.
        """
        current = self.stage
        if target is None:
            target = next_stage(current) if self.state is not None else None
            if target is None:
                raise ValueError(
                    f"slot {self.slot_id!r} in stage {current.name} has no next stage to advance to"
                    + ("; germinate a seed first" if self.state is None else "")
                )
        target = SeedStage(target)
        if self.state is None:
            check_transition(current, target)
            raise ValueError(f"slot {self.slot_id!r} is empty; germinate a seed first")
        check_transition(current, target)
        if target == SeedStage.PRUNED:
            return self.prune("advance_stage", initiator="policy")
        blocked = None if self.permissive_gates else self._gate_blocks(target)
        if blocked is not None:
            logger.debug("slot %s: gate %s -> %s held: %s", self.slot_id, current.name, target.name, blocked)
            return False
        self._enter(target)
        return True

    def prune(self, reason: str = "", *, initiator: str = "policy") -> bool:
        """Remove an experimental seed; the slot goes PRUNED and starts its embargo.

        Returns True when a seed was removed, False when there was nothing prunable (empty,
        already pruned or embargoed, or fossilized: a fossil is part of the host). A seed with
        no lifecycle record (``state`` set to None by hand) counts as on trial and is pruned too:
        keeping it, or dropping it without an embargo, would let an unvetted graft slip past a
        rollback.
        """
        if self.state is None and self.seed is not None:
            self.state = SeedState(
                stage=SeedStage.UNKNOWN,
                seed_id=f"{self.slot_id}-{self._seed_blueprint}-{self._germinations}",
                blueprint_id=self._seed_blueprint or "",
                slot_id=self.slot_id,
            )
        elif self.state is None or self.state.stage not in EXPERIMENTAL_STAGES:
            return False
        self.state.prune_reason = reason
        self.state.prune_initiator = initiator
        self._enter(SeedStage.PRUNED)
        logger.info("slot %s: pruned seed %s by %s: %s", self.slot_id, self.state.seed_id, initiator, reason)
        return True

    def step_epoch(self) -> None:
        """Advance the slot's clock by one epoch (blend ramp, embargo countdown).

        The embargo ends ``embargo_epochs`` epochs after the prune: the slot passes through
        RESETTING and is DORMANT (``state`` None) when the call returns. A slot left in
        RESETTING (moved there early with ``advance_stage``, or restored so) is cleaned at its
        next epoch.
        """
        if self.state is None:
            return
        self.state.epochs_in_stage += 1
        self.state.epochs_total += 1
        stage = self.state.stage
        if stage == SeedStage.BLENDING and self.alpha_schedule is not None:
            self.alpha_schedule.step()
        elif stage == SeedStage.PRUNED:
            self._enter(SeedStage.EMBARGOED)
        elif stage == SeedStage.RESETTING:
            # Without this a RESETTING slot would wait forever: nothing else moves it on.
            self._enter(SeedStage.DORMANT)
            return
        if self.state.stage == SeedStage.EMBARGOED and self.state.epochs_total >= self.embargo_epochs:
            self._enter(SeedStage.RESETTING)
            self._enter(SeedStage.DORMANT)

    def _gate_blocks(self, target: SeedStage) -> str | None:
        assert self.state is not None
        waited = self.state.epochs_in_stage
        if target in (SeedStage.BLENDING, SeedStage.FOSSILIZED) and waited < self.min_epochs_in_stage:
            return f"{waited} epoch(s) in {self.state.stage.name}, need {self.min_epochs_in_stage}"
        if target == SeedStage.HOLDING and (self.alpha_schedule is None or not self.alpha_schedule.complete):
            return "blend not finished"
        return None

    def _enter(self, target: SeedStage) -> None:
        """Apply ``target``'s side effects; the caller has checked the move is legal."""
        assert self.state is not None
        if target == SeedStage.BLENDING:
            self._set_schedule(True)
        elif target in (SeedStage.HOLDING, SeedStage.FOSSILIZED):
            self._set_schedule(False)
        elif target == SeedStage.PRUNED:
            self._set_seed(None)
            self._set_schedule(False)
            # From here epochs_total counts the embargo.
            self.state.epochs_total = 0
        elif target == SeedStage.DORMANT:
            # DORMANT means empty: no state and no seed, whatever stage was assigned by hand before.
            self._set_seed(None)
            self._set_schedule(False)
            self.state = None
            return
        self.state.stage = target
        self.state.epochs_in_stage = 0

    def _set_seed(self, blueprint_id: str | None) -> None:
        if blueprint_id is None:
            self.seed = None
        else:
            seed = create_seed(blueprint_id, self.kind, self.dim, self.seed_options)
            dtype = self._anchor.dtype if self._anchor.is_floating_point() else None
            self.seed = seed.to(device=self._anchor.device, dtype=dtype)
        self._seed_blueprint = blueprint_id

    def _set_schedule(self, present: bool) -> None:
        if present and self.alpha_schedule is None:
            self.alpha_schedule = AlphaSchedule(self.blend_epochs).to(self._anchor.device)
        elif not present:
            self.alpha_schedule = None

    # ----------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` plus the seed's contribution for the current stage; shape preserved."""
        seed, stage = self.seed, self.stage
        if seed is None or self.state is None or stage not in SEED_BEARING_STAGES:
            return features
        if stage == SeedStage.GERMINATED:
            return features
        if stage == SeedStage.TRAINING:
            delta = seed(features.detach())
            # Straight-through: value exactly ``features``, gradient reaches the seed as if alpha were 1.
            return features + (delta - delta.detach())
        if stage == SeedStage.BLENDING:
            alpha = self.alpha_schedule.alpha_tensor() if self.alpha_schedule is not None else 0.0
            return features + alpha * seed(features)
        return features + seed(features)

    # ----------------------------------------------------------------- state dict
    def get_extra_state(self) -> dict[str, Any]:
        """The lifecycle: ``{"version", "state" (SeedState.to_dict() or None), "alpha_schedule"}``."""
        return {
            "version": _EXTRA_STATE_VERSION,
            "state": self.state.to_dict() if self.state is not None else None,
            "alpha_schedule": self.alpha_schedule is not None,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore the lifecycle and make the submodules match it.

        Called by ``load_state_dict`` before this slot's children are loaded, so creating or
        dropping ``seed``/``alpha_schedule`` here lets their keys load into the right shape:
        a snapshot taken before a germination or a prune still restores cleanly. A seed whose
        blueprint already matches is kept (same Parameter objects); a recreated one starts
        fresh and takes its weights from the state dict being loaded, if it has them.
        """
        payload = decode_extra_state(state)
        raw_state = payload.get("state")
        new_state = SeedState.from_dict(raw_state) if raw_state else None
        if new_state is not None and new_state.stage == SeedStage.DORMANT:
            new_state = None  # an empty slot has no state (as after RESETTING -> DORMANT)
        if new_state is not None:
            new_state.slot_id = self.slot_id
        bears_seed = new_state is not None and new_state.stage in SEED_BEARING_STAGES
        if not bears_seed:
            self._set_seed(None)
        elif self.seed is None or self._seed_blueprint != new_state.blueprint_id:  # type: ignore[union-attr]
            self._set_seed(new_state.blueprint_id)  # type: ignore[union-attr]
        self._set_schedule(bears_seed and bool(payload.get("alpha_schedule")))
        self.state = new_state

    def extra_repr(self) -> str:
        blueprint = f", blueprint={self.state.blueprint_id}" if self.state is not None else ""
        return f"slot_id={self.slot_id}, kind={self.kind}, dim={self.dim}, stage={self.stage.name}{blueprint}"


def decode_extra_state(state: Any) -> dict[str, Any]:
    """Check a slot's ``_extra_state`` and return it as a payload dict.

    Raises TypeError for anything but a mapping, ValueError for a newer format version.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"slot extra state must be a dict from get_extra_state(), got {type(state).__name__}")
    payload = dict(state)
    version = int(payload.get("version", _EXTRA_STATE_VERSION))
    if version > _EXTRA_STATE_VERSION:
        raise ValueError(f"slot extra state version {version} is newer than supported {_EXTRA_STATE_VERSION}")
    return payload


__all__ = ["DEFAULT_BLEND_EPOCHS", "AlphaSchedule", "SeedSlot", "decode_extra_state"]
