"""The demo's control run: the same storm, with plain rollbacks and no recovery policy.

When an ``lr_storm`` starts, :class:`PlainTwin` copies the model and the optimizer and trains the
copy on the very same batches through the storm, under a Governor without a
:class:`tolaria.RecoveryPolicy`. Its rollbacks are what the policy saved the real run from. Its
telemetry goes to a private hub, so the demo's own events and telemetry file stay the real run's.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tolaria import telemetry as tm
from tolaria.demo.faults import StormSchedule
from tolaria.governor import TolariaGovernor
from tolaria.guard import GuardedStep

logger = logging.getLogger(__name__)


@contextmanager
def _private_hub() -> Any:
    previous = tm.set_hub(tm.TelemetryHub())
    try:
        yield
    finally:
        tm.set_hub(previous)


class PlainTwin:
    """A copy of the run at the start of a storm, trained through it with plain rollbacks.

    ``storm`` is the real run's storm (its factor and length), ``governor`` the real run's (its
    monitors' histories are copied)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        storm: StormSchedule,
        start: int,
        governor: TolariaGovernor,
        *,
        random_guess_loss: float,
        snapshot_every: int,
    ) -> None:
        # One deepcopy for both keeps the optimizer pointing at the copy's parameters (seed
        # groups included); the real optimizer's step hooks (tolaria's) stay behind.
        memo: dict[int, Any] = {
            id(optimizer._optimizer_step_pre_hooks): OrderedDict(),
            id(optimizer._optimizer_step_post_hooks): OrderedDict(),
        }
        self.model, self.optimizer = copy.deepcopy((model, optimizer), memo)
        self.storm = StormSchedule(self.optimizer, storm.factor, storm.steps)
        self.storm.start(start)
        self.rollbacks = 0
        self.rollback_steps: list[int] = []
        with _private_hub():
            control = TolariaGovernor(
                self.model, optimizer=self.optimizer, random_guess_loss=random_guess_loss
            )
            # The control starts with the real run's monitor histories: a fresh Governor would be
            # blind for its first ten steps, and the storm is over in thirty.
            for mine, theirs in ((control._watch.loss.spikes, governor._watch.loss.spikes),
                                 (control._watch.grad_norms, governor._watch.grad_norms)):  # fmt: skip
                mine.history.extend(theirs.history)
            self.guard = GuardedStep(control, self.optimizer, snapshot_every=snapshot_every)

    def active(self, step: int) -> bool:
        """Whether the copy still has storm steps to run."""
        return self.storm.active(step)

    def step(self, step: int, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """One storm step of the copy on the real run's batch (``loss_of(model)``)."""
        self.storm.apply(step)
        with _private_hub():
            outcome = self.guard(lambda: loss_of(self.model))
        if outcome.rolled_back:
            self.rollbacks += 1
            self.rollback_steps.append(step)


__all__ = ["PlainTwin"]
