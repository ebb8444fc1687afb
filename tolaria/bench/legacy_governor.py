"""Our re-implementation of the original Governor's approach, the baseline of the benchmarks.

It does what esper-lite's first Tolaria did, on purpose without any of tolaria's machinery:
a pageable ``state_dict`` clone every snapshot (``v.detach().cpu().clone()``: per tensor, a
blocking device→host copy into fresh pageable memory, then a host clone; on CPU the clone
alone), a loss-only statistical monitor, and a Python loop of
``torch.isfinite(p).all()`` over the parameters (one reduction and one host sync per tensor).
It exists only so that the bench can time the old way next to the new one in the same run.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn


class LegacyGovernor:
    """The old approach: pageable snapshots, loss-only vital signs, per-tensor isfinite."""

    def __init__(
        self,
        model: nn.Module,
        *,
        sensitivity: float = 6.0,
        multiplier: float = 3.0,
        absolute_threshold: float = 12.0,
        history_window: int = 20,
        min_panics: int = 3,
    ) -> None:
        self.model = model
        self.sensitivity = sensitivity
        self.multiplier = multiplier
        self.absolute_threshold = absolute_threshold
        self.loss_history: deque[float] = deque(maxlen=history_window)
        self.min_panics = min_panics
        self.consecutive_panics = 0
        self.last_good_state: dict[str, torch.Tensor] = {}

    def snapshot(self) -> None:
        """Clone every state-dict entry to pageable host memory (the original's method)."""
        self.last_good_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def parameters_finite(self) -> bool:
        """One reduction and one host synchronisation per parameter."""
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def check_vital_signs(self, loss: float | torch.Tensor) -> bool:
        """Loss-only monitor with the original rules; True means panic."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            return True
        if len(self.loss_history) < 10:
            self.loss_history.append(value)
            return False
        mean = sum(self.loss_history) / len(self.loss_history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.loss_history) / len(self.loss_history))
        anomalous = (
            value > self.absolute_threshold
            and value > mean + self.sensitivity * std
            and value > self.multiplier * mean
        )
        if anomalous:
            self.consecutive_panics += 1
            return self.consecutive_panics >= self.min_panics
        self.consecutive_panics = 0
        self.loss_history.append(value)
        return False

    def execute_rollback(self) -> None:
        """Load the pageable snapshot back (strict=False, as the original did for seeds)."""
        self.model.load_state_dict(self.last_good_state, strict=False)
        self.consecutive_panics = 0
