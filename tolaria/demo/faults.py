"""Scheduled fault injection for ``tolaria demo``: four ways a training run gets sick.

``--faults`` SPEC grammar::

    SPEC  := "default" | "none" | ITEM ("," ITEM)*
    ITEM  := KIND "@" STEP
    KIND  := "nan_weight" | "inf_grad" | "lr_blowup" | "lobotomy" | "lr_storm"
    STEP  := integer, 0 <= STEP < steps (0-based step index; each step at most once)

for example ``nan_weight@60,inf_grad@120,lr_blowup@180,lobotomy@240``. Spaces around items are
ignored and kinds are case-insensitive. ``default`` spreads the five kinds over the run at 15%,
30%, 45%, 60% and 70% of ``steps``; ``none`` trains without faults.

A fault is injected just before its step's forward pass and is expected to be caught by:

* ``nan_weight`` — one NaN written into a weight of the first block: the loss is NaN at once
  (``governor_nan``).
* ``inf_grad`` — a one-shot gradient hook puts an Inf into the first block's weight gradient:
  ``check_health`` finds non-finite gradients (``governor_nonfinite_grads``).
* ``lr_blowup`` — every parameter group's learning rate is multiplied by ``lr_blowup_factor``:
  the next updates throw the loss far above the absolute threshold, and three anomalies in a
  row are a divergence (``governor_divergence``; a NaN or gradient panic may come first). The
  Governor restores weights and optimizer state but not hyperparameters, so the injector puts
  the learning rate back after the rollback, as a user reacting to the rollback would.
* ``lobotomy`` — the output layer is zeroed, so every prediction is uniform and the loss lands
  on ln(classes) (``governor_lobotomy``). The Governor only calls that a lobotomy when its recent
  losses average below 0.6·ln(classes), so schedule it after the loss has fallen that far.
* ``lr_storm`` — a recurring fault: the schedule holds the learning rate at ``lr_storm_factor``
  times its value for ``lr_storm_steps`` steps, rollback or not, as a bad warm-up or a
  mis-set scheduler would. A plain rollback walks straight back into it; the demo's
  :class:`tolaria.RecoveryPolicy` backs the learning rate off and gets through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

#: Every fault kind, with the one-line description the CLI help and the summary use.
FAULT_KINDS: dict[str, str] = {
    "nan_weight": "a NaN written into a weight",
    "inf_grad": "an Inf in a gradient",
    "lr_blowup": "learning rate multiplied until the loss diverges",
    "lobotomy": "output layer zeroed (uniform predictions)",
    "lr_storm": "learning rate held high by the schedule for many steps (recurring)",
}
#: Where ``default`` puts the four kinds, as fractions of the run.
DEFAULT_FAULT_FRACTIONS: tuple[tuple[str, float], ...] = (
    ("nan_weight", 0.15),
    ("inf_grad", 0.3),
    ("lr_blowup", 0.45),
    ("lobotomy", 0.6),
    ("lr_storm", 0.7),
)
#: Large enough that one SGD update throws a trained classifier's loss past the absolute
#: threshold (12 nats) on both demo tasks.
DEFAULT_LR_BLOWUP_FACTOR = 1000.0
#: The storm: how much the schedule raises the learning rate, and for how many steps.
DEFAULT_LR_STORM_FACTOR = 100.0
DEFAULT_LR_STORM_STEPS = 30

_ITEM = re.compile(r"^(?P<kind>[a-z_]+)@(?P<step>[+-]?\d+)$")


class FaultSpecError(ValueError):
    """A ``--faults`` SPEC that does not parse or does not fit the run; the message says why."""


@dataclass(frozen=True, order=True)
class ScheduledFault:
    """Inject fault ``kind`` just before the forward pass of 0-based ``step``."""

    step: int
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}@{self.step}"


def default_fault_schedule(steps: int) -> tuple[ScheduledFault, ...]:
    """The five kinds at 15/30/45/60/70% of ``steps``."""
    return tuple(ScheduledFault(int(steps * fraction), kind) for kind, fraction in DEFAULT_FAULT_FRACTIONS)


def parse_fault_spec(spec: str, steps: int) -> tuple[ScheduledFault, ...]:
    """Parse a SPEC (see the module docstring) for a run of ``steps`` steps; sorted by step.

    Raises FaultSpecError naming the offending item: an unknown kind (listing the known ones), a
    malformed item, a step outside ``[0, steps)``, two faults at one step, or an empty SPEC.
    """
    text = spec.strip().lower()
    if text == "default":
        return default_fault_schedule(steps)
    if text == "none":
        return ()
    if not text:
        raise FaultSpecError("empty fault SPEC; use 'default', 'none' or KIND@STEP[,KIND@STEP...]")
    faults: list[ScheduledFault] = []
    for raw in text.split(","):
        item = raw.strip()
        match = _ITEM.match(item)
        if match is None:
            raise FaultSpecError(
                f"bad fault item {raw.strip()!r}: expected KIND@STEP such as 'nan_weight@60' "
                f"(kinds: {', '.join(FAULT_KINDS)})"
            )
        kind, step = match["kind"], int(match["step"])
        if kind not in FAULT_KINDS:
            raise FaultSpecError(
                f"unknown fault kind {kind!r} in {item!r}; known kinds: {', '.join(FAULT_KINDS)}"
            )
        if not 0 <= step < steps:
            raise FaultSpecError(f"fault {item!r} is outside the run: STEP must be in [0, {steps - 1}]")
        faults.append(ScheduledFault(step, kind))
    taken: dict[int, ScheduledFault] = {}
    for fault in faults:
        if fault.step in taken:
            raise FaultSpecError(
                f"two faults at step {fault.step} ({taken[fault.step]}, {fault}); one per step"
            )
        taken[fault.step] = fault
    return tuple(sorted(faults))


def _host(model: nn.Module) -> nn.Module:
    host = getattr(model, "host", model)
    return host if isinstance(host, nn.Module) else model


def first_block_weight(model: nn.Module) -> nn.Parameter:
    """The first weight (≥ 2-D) of the host's first block — a tensor every forward pass uses."""
    host = _host(model)
    blocks = getattr(host, "blocks", None)
    candidates: Iterable[nn.Parameter] = (
        blocks[0].parameters() if isinstance(blocks, nn.ModuleList) and len(blocks) else host.parameters()
    )
    for param in candidates:
        if param.dim() >= 2:
            return param
    raise ValueError(f"{type(host).__name__} has no weight with two or more dimensions to corrupt")


def output_layer(model: nn.Module) -> list[torch.Tensor]:
    """The parameters that produce the logits: a CNN's ``head``, a transformer's ``lm_head`` or,
    with tied weights, the token embedding it shares."""
    host = _host(model)
    for name in ("lm_head", "head"):
        layer = getattr(host, name, None)
        if isinstance(layer, nn.Module):
            return list(layer.parameters())
    embedding = getattr(host, "tok_emb", None)
    if isinstance(embedding, nn.Embedding):
        return [embedding.weight]
    raise ValueError(f"cannot find the output layer of {type(host).__name__} (no head, lm_head or tok_emb)")


class FaultInjector:
    """Applies a schedule of faults to ``model`` and ``optimizer``.

    Call :meth:`inject` before each step, :meth:`end_step` after it and :meth:`after_rollback`
    after every rollback.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Iterable[ScheduledFault],
        *,
        lr_blowup_factor: float = DEFAULT_LR_BLOWUP_FACTOR,
        lr_storm_factor: float = DEFAULT_LR_STORM_FACTOR,
        lr_storm_steps: int = DEFAULT_LR_STORM_STEPS,
    ) -> None:
        if not lr_blowup_factor > 1.0:
            raise ValueError(f"lr_blowup_factor must be > 1, got {lr_blowup_factor!r}")
        if not lr_storm_factor > 1.0:
            raise ValueError(f"lr_storm_factor must be > 1, got {lr_storm_factor!r}")
        if isinstance(lr_storm_steps, bool) or not isinstance(lr_storm_steps, int) or lr_storm_steps < 1:
            raise ValueError(f"lr_storm_steps must be an int >= 1, got {lr_storm_steps!r}")
        self.model = model
        self.optimizer = optimizer
        self.by_step = {fault.step: fault for fault in schedule}
        self.lr_blowup_factor = float(lr_blowup_factor)
        self.storm = StormSchedule(optimizer, float(lr_storm_factor), lr_storm_steps)
        self._saved_lrs: list[tuple[dict[str, object], object]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def inject(self, step: int) -> ScheduledFault | None:
        """Apply a storm in progress, inject the fault scheduled for ``step``, if any, and
        return it."""
        fault = self.by_step.get(step)
        if fault is not None and fault.kind == "lr_storm":
            self.storm.start(step)
        self.storm.apply(step)
        if fault is None:
            return None
        if fault.kind == "nan_weight":
            with torch.no_grad():
                first_block_weight(self.model).view(-1)[0] = float("nan")
        elif fault.kind == "inf_grad":
            self._hooks.append(first_block_weight(self.model).register_hook(_poison_gradient))
        elif fault.kind == "lr_blowup":
            if not self._saved_lrs:  # a second blow-up before a rollback keeps the original rates
                self._saved_lrs = [(group, group["lr"]) for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_blowup_factor
        elif fault.kind == "lobotomy":
            with torch.no_grad():
                for param in output_layer(self.model):
                    param.zero_()
        elif fault.kind != "lr_storm":  # parse_fault_spec only produces known kinds
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        return fault

    def end_step(self) -> None:
        """Remove this step's gradient hooks: an injected Inf gradient is a one-off."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def after_rollback(self) -> bool:
        """Put blown-up learning rates back (the Governor does not restore hyperparameters);
        True when there was something to restore."""
        restored = bool(self._saved_lrs)
        for group, lr in self._saved_lrs:
            group["lr"] = lr
        self._saved_lrs = []
        return restored


class StormSchedule:
    """The learning-rate schedule of an ``lr_storm``: ``factor`` times the base rates for
    ``steps`` steps from :meth:`start`, whatever happens in between (rollbacks included), then
    the base rates again. Set before each step, as a scheduler would."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: float, steps: int) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.steps = steps
        self.until: int | None = None
        self._base: list[object] = []

    def start(self, step: int) -> None:
        if self.until is None:
            self._base = [group["lr"] for group in self.optimizer.param_groups]
        self.until = step + self.steps

    def active(self, step: int) -> bool:
        return self.until is not None and step < self.until

    def apply(self, step: int) -> None:
        if self.until is None:
            return
        storming = step < self.until
        for group, base in zip(self.optimizer.param_groups, self._base, strict=True):
            group["lr"] = base * self.factor if storming else base  # type: ignore[operator]
        if not storming:
            self.until = None


def _poison_gradient(grad: torch.Tensor) -> torch.Tensor:
    poisoned = grad.clone()
    poisoned.view(-1)[0] = float("inf")
    return poisoned


__all__ = [
    "DEFAULT_LR_BLOWUP_FACTOR",
    "DEFAULT_LR_STORM_FACTOR",
    "DEFAULT_LR_STORM_STEPS",
    "StormSchedule",
    "FAULT_KINDS",
    "FaultInjector",
    "FaultSpecError",
    "ScheduledFault",
    "default_fault_schedule",
    "first_block_weight",
    "output_layer",
    "parse_fault_spec",
]
