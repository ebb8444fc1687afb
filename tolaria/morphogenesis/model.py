"""MorphogeneticModel: a host plus the seed slots chosen for it.

The slots live in ``self.seed_slots`` (an ``nn.ModuleDict`` in forward order), so their
state-dict keys are ``seed_slots.<id>.seed.*``, ``seed_slots.<id>.alpha_schedule.*`` and
``seed_slots.<id>._extra_state`` — the layout the Governor filters on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tolaria.constants import DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE
from tolaria.morphogenesis.hosts import HostNetwork
from tolaria.morphogenesis.slot import DEFAULT_BLEND_EPOCHS, SeedSlot
from tolaria.morphogenesis.stages import SeedStage, SeedState


def validate_slots(slots: Sequence[str] | None, valid_ids: Sequence[str]) -> tuple[str, ...]:
    """Check a user's slot list against ``valid_ids``; returns it as a tuple.

    Raises ValueError when ``slots`` is None, a bare string, empty, contains duplicates
    ("slots contains duplicates: ...", naming each) or names an unknown slot (listing the
    valid ids).
    """
    valid = list(valid_ids)
    if slots is None or isinstance(slots, str):
        raise ValueError(
            f"slots must be a non-empty sequence of slot ids such as {valid[:1]}, got {slots!r}; "
            f"valid slot ids: {valid}"
        )
    chosen = tuple(slots)
    if not chosen:
        raise ValueError(f"slots must name at least one slot; valid slot ids: {valid}")
    duplicates = sorted(slot for slot, count in Counter(chosen).items() if count > 1)
    if duplicates:
        raise ValueError(f"slots contains duplicates: {duplicates}; each slot may be listed once")
    unknown = [slot for slot in chosen if slot not in valid]
    if unknown:
        raise ValueError(f"unknown slot(s) {unknown} in slots; valid slot ids: {valid}")
    return chosen


class MorphogeneticModel(nn.Module):
    """A host network with seed slots at a chosen subset of its injection points.

    Args:
        host: a :class:`HostNetwork` (``CNNHost``, ``TransformerHost`` ...).
        device: where to put the model (anything ``torch.device`` accepts).
        slots: ids of the injection points that get a slot; None means all of them.
        permissive_gates: when False, stage advances also pass quality gates.
        embargo_epochs, blend_epochs: per-slot lifecycle lengths, see :class:`SeedSlot`.

    Raises ValueError for empty, duplicate or unknown slots (see :func:`validate_slots`).
    """

    host: HostNetwork
    seed_slots: nn.ModuleDict

    def __init__(
        self,
        host: HostNetwork,
        device: str | torch.device = "cpu",
        slots: Sequence[str] | None = None,
        *,
        permissive_gates: bool = True,
        embargo_epochs: int = DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE,
        blend_epochs: int = DEFAULT_BLEND_EPOCHS,
    ) -> None:
        super().__init__()
        chosen = set(validate_slots(host.slot_ids if slots is None else slots, host.slot_ids))
        self.host = host
        self.permissive_gates = permissive_gates
        # Built in the host's forward order, whatever order the caller listed them in.
        self.seed_slots = nn.ModuleDict(
            {
                point.slot_id: SeedSlot(
                    point.slot_id,
                    point.dim,
                    point.kind,
                    seed_options=point.seed_options,
                    permissive_gates=permissive_gates,
                    embargo_epochs=embargo_epochs,
                    blend_epochs=blend_epochs,
                )
                for point in host.injection_points
                if point.slot_id in chosen
            }
        )
        self.to(device)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.host(inputs, self.seed_slots)

    # ----------------------------------------------------------------- slots
    @property
    def slot_ids(self) -> tuple[str, ...]:
        """Ids of this model's slots, in forward order."""
        return tuple(self.seed_slots.keys())

    def get_slot(self, slot: str) -> SeedSlot:
        """The slot named ``slot``; an unknown id raises ValueError listing this model's slots."""
        if slot not in self.seed_slots:
            raise ValueError(f"unknown slot {slot!r}; slots of this model: {list(self.slot_ids)}")
        found = self.seed_slots[slot]
        assert isinstance(found, SeedSlot)
        return found

    def iter_slots(self) -> Iterator[SeedSlot]:
        """The slots, in forward order."""
        for slot_id in self.slot_ids:
            yield self.get_slot(slot_id)

    @property
    def slot_states(self) -> dict[str, SeedState | None]:
        """Slot id → its seed's state (None for an empty slot)."""
        return {slot.slot_id: slot.state for slot in self.iter_slots()}

    # ----------------------------------------------------------------- lifecycle
    def germinate_seed(self, blueprint_id: str, seed_id: str | None = None, *, slot: str) -> SeedState:
        """Graft a ``blueprint_id`` seed into ``slot``; see :meth:`SeedSlot.germinate`."""
        return self.get_slot(slot).germinate(blueprint_id, seed_id)

    def advance_seed(self, *, slot: str, target: SeedStage | None = None) -> bool:
        """Advance the seed in ``slot``; see :meth:`SeedSlot.advance_stage`."""
        return self.get_slot(slot).advance_stage(target)

    def prune_seed(self, *, slot: str, reason: str = "", initiator: str = "policy") -> bool:
        """Prune the seed in ``slot``; True when one was removed (see :meth:`SeedSlot.prune`)."""
        return self.get_slot(slot).prune(reason, initiator=initiator)

    def step_epoch(self) -> None:
        """Advance every slot's clock by one epoch."""
        for slot in self.iter_slots():
            slot.step_epoch()

    def count_active_seeds(self) -> int:
        """Seeds still on trial (GERMINATED through HOLDING); fossils are not counted."""
        return sum(1 for slot in self.iter_slots() if slot.is_active and slot.stage != SeedStage.FOSSILIZED)

    def count_fossilized_seeds(self) -> int:
        """Seeds made permanent."""
        return sum(1 for slot in self.iter_slots() if slot.stage == SeedStage.FOSSILIZED)

    # ----------------------------------------------------------------- parameters
    def get_host_parameters(self) -> Iterator[nn.Parameter]:
        """The host's parameters (seeds excluded), e.g. for the host's optimizer group."""
        return self.host.parameters()

    def get_seed_parameters(self, slot: str | None = None) -> Iterator[nn.Parameter]:
        """Parameters of the seeds in all slots, or only in ``slot`` (unknown: ValueError)."""
        # Not a generator: an unknown slot must raise here, not at first iteration.
        chosen = [self.get_slot(slot)] if slot is not None else list(self.iter_slots())
        return iter([p for s in chosen if s.seed is not None for p in s.seed.parameters()])

    def total_params(self) -> int:
        """Number of parameter elements, host plus seeds, each shared tensor counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


__all__ = ["MorphogeneticModel", "validate_slots"]
