"""A learning-rate factor that composes with any scheduler.

The factor is applied to the learning rate the optimizer *steps with*, not to what the scheduler
keeps: an optimizer step pre-hook multiplies every param group's ``lr`` by it and the matching
post-hook puts the scheduler's value back. So ``scheduler.step()`` (LambdaLR, OneCycleLR,
CosineAnnealingLR, ReduceLROnPlateau, chainable or closed-form) never undoes a backoff, and the
backoff never corrupts a scheduler that reads ``group["lr"]`` back (the chainable ones do).
"""

from __future__ import annotations

from typing import Any

import torch


class LrFactor:
    """Scales the learning rate ``optimizer`` steps with by :attr:`factor` (1.0: untouched).

    :meth:`back_off` multiplies the factor; :meth:`healthy_step` warms it back to 1
    geometrically over ``recovery_steps`` healthy steps from the value it had after the last
    backoff.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.factor = 1.0
        self._start = 1.0
        self._healthy = 0
        self._saved: list[Any] | None = None
        self._handles = (
            optimizer.register_step_pre_hook(self._scale),
            optimizer.register_step_post_hook(self._unscale),
        )

    def _scale(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._saved is not None:  # the previous step raised before its post-hook ran
            self._unscale(optimizer, args, kwargs)
        if self.factor == 1.0:
            return
        self._saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * self.factor

    def _unscale(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        for group, lr in zip(self.optimizer.param_groups, saved, strict=False):
            group["lr"] = lr

    def back_off(self, multiplier: float) -> float:
        """Multiply the factor by ``multiplier`` (a second backoff within the recovery window
        compounds); returns the new factor."""
        self.factor *= multiplier
        self._start, self._healthy = self.factor, 0
        return self.factor

    def healthy_step(self, recovery_steps: int) -> None:
        """One healthy step: move the factor towards 1 (reached after ``recovery_steps``)."""
        if self.factor == 1.0:
            return
        self._healthy += 1
        if recovery_steps <= 0 or self._healthy >= recovery_steps:
            self.factor = self._start = 1.0
            return
        # Geometric, as learning rates are tuned: from 0.01 the factor passes 0.1 halfway, so a
        # deep backoff is not undone within a few steps by a linear ramp.
        self.factor = self._start ** (1.0 - self._healthy / recovery_steps)

    def effective_lrs(self) -> list[float]:
        """The learning rates the next optimizer step uses, per param group."""
        return [float(group["lr"]) * self.factor for group in self.optimizer.param_groups]

    def remove(self) -> None:
        """Take the hooks off (the optimizer steps with the scheduler's values again)."""
        for handle in self._handles:
            handle.remove()


__all__ = ["LrFactor"]
