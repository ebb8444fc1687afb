"""GovernorProtocol: the structural type a training loop can be written against."""

from __future__ import annotations

from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.protocol import GovernorProtocol


class StubGovernor:
    """The least a Governor needs: the four calls of the protocol."""

    def snapshot(self) -> None:
        pass

    def check_vital_signs(self, current_loss: float) -> bool:
        return current_loss != current_loss  # NaN

    def reset(self) -> None:
        pass

    def get_punishment_reward(self) -> float:
        return -10.0


class NoPunishment:
    def snapshot(self) -> None:
        pass

    def check_vital_signs(self, current_loss: float) -> bool:
        return False

    def reset(self) -> None:
        pass


def test_a_stub_with_the_four_methods_satisfies_the_protocol() -> None:
    governor: GovernorProtocol = StubGovernor()
    assert isinstance(governor, GovernorProtocol)
    assert governor.check_vital_signs(current_loss=float("nan")) is True


def test_a_class_missing_a_method_does_not() -> None:
    assert not isinstance(NoPunishment(), GovernorProtocol)
    assert not isinstance(object(), GovernorProtocol)


def test_tolaria_governor_satisfies_the_protocol() -> None:
    assert isinstance(TolariaGovernor(nn.Linear(2, 2)), GovernorProtocol)
