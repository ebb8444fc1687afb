"""Defaults of the Governor, under the names and values of the original esper-lite Tolaria.

Code written against the original Governor imports these names from here unchanged.
"""

from __future__ import annotations

from typing import Final

#: Standard deviations above the mean loss that count as anomalous.
DEFAULT_GOVERNOR_SENSITIVITY: Final[float] = 6.0
#: An anomalous loss must also exceed this multiple of the mean loss.
DEFAULT_GOVERNOR_LOSS_MULTIPLIER: Final[float] = 3.0
#: An anomalous loss must also exceed this absolute value (nats).
DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD: Final[float] = 12.0
#: Magnitude of the negative reward returned by ``get_punishment_reward()``.
DEFAULT_GOVERNOR_DEATH_PENALTY: Final[float] = 10.0
#: Number of recent healthy losses the monitor keeps.
DEFAULT_GOVERNOR_HISTORY_WINDOW: Final[int] = 20
#: Consecutive anomalies needed before a divergence panic.
DEFAULT_MIN_PANICS_BEFORE_ROLLBACK: Final[int] = 3
#: Samples of history needed before statistical checks run (and the smallest history window).
MIN_GOVERNOR_HISTORY_SAMPLES: Final[int] = 10
#: Epochs a slot stays pruned/embargoed before it can host a new seed.
DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE: Final[int] = 5
#: The "m·mean" of the gradient-norm detector (tolaria's own; the original has no such detector):
#: an explosion must be an order of magnitude above the recent mean. Healthy Adam runs swing well
#: past the loss multiplier (3): the fault-free tinystories demo was rolled back twice for runs of
#: three norms at 3-8x the mean, each also past mean + 6·std of a calm history; the demo's real
#: blow-ups measure ~240x and ~20000x. Adam bounds the per-coordinate update, so a short swing of
#: a few x cannot do the damage a rollback is for.
DEFAULT_GRAD_NORM_MULTIPLIER: Final[float] = 10.0

__all__ = [
    "DEFAULT_EMBARGO_EPOCHS_AFTER_PRUNE",
    "DEFAULT_GOVERNOR_ABSOLUTE_THRESHOLD",
    "DEFAULT_GOVERNOR_DEATH_PENALTY",
    "DEFAULT_GOVERNOR_HISTORY_WINDOW",
    "DEFAULT_GOVERNOR_LOSS_MULTIPLIER",
    "DEFAULT_GOVERNOR_SENSITIVITY",
    "DEFAULT_GRAD_NORM_MULTIPLIER",
    "DEFAULT_MIN_PANICS_BEFORE_ROLLBACK",
    "MIN_GOVERNOR_HISTORY_SAMPLES",
]
