"""GovernorProtocol: what a training loop needs from a Governor, as a structural type.

A trainer typed against this protocol accepts the original esper-lite Governor, tolaria's
:class:`~tolaria.governor.TolariaGovernor` or a test double alike, without importing any of them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class GovernorProtocol(Protocol):
    """The Governor calls a training loop makes.

    ``isinstance(obj, GovernorProtocol)`` only checks that the four methods exist (that is all
    ``runtime_checkable`` can see); static type checkers also check their signatures.
    """

    def snapshot(self) -> Any:
        """Capture the Last Known Good state (the return value differs between Governors)."""
        ...

    def check_vital_signs(self, current_loss: float) -> bool:
        """Judge this step's loss (nats); True means panic: call the rollback."""
        ...

    def reset(self) -> None:
        """Start a new episode: forget the loss history and take a fresh snapshot."""
        ...

    def get_punishment_reward(self) -> float:
        """The (negative) reward for the controller whose action caused a rollback."""
        ...


__all__ = ["GovernorProtocol"]
