"""A layer that lets a test act in the middle of a rollback's restore."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class RestoreHook(nn.Module):
    """An identity layer with module extra state, which a rollback restores after the weights
    and before the optimizer state: ``on_restore`` runs in the middle of the restore (to fail,
    hang or interrupt it there)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_restore: Callable[[], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def get_extra_state(self) -> dict[str, int]:
        return {"version": 1}

    def set_extra_state(self, state: Any) -> None:
        if self.on_restore is not None:
            self.on_restore()
