"""What every framework integration shares; imports no framework.

:class:`GovernedRun` holds an integration's options until training starts, then the Governor and
the :class:`tolaria.hooks.TrainerHook` it judges steps with, and the counters that go into the
framework's logs as ``tolaria/*`` metrics (:data:`METRIC_NAMES`).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from tolaria.governor import TolariaGovernor
from tolaria.hooks import DEFAULT_SCALER_OVERFLOW_LIMIT, StepOutcome, TrainerHook, check_count

#: The metrics every integration logs (``tolaria/grad_norm`` only once a step's gradients were judged).
METRIC_NAMES = ("tolaria/rollbacks", "tolaria/scaler_skips", "tolaria/grad_norm", "tolaria/last_panic")
#: What the integration supplies to the Governor itself.
_SUPPLIED = frozenset({"self", "model", "optimizer"})


def governor_option_names() -> tuple[str, ...]:
    """The keyword options of :class:`TolariaGovernor` an integration passes on."""
    names = inspect.signature(TolariaGovernor.__init__).parameters
    return tuple(name for name in names if name not in _SUPPLIED)


@dataclass
class RunCounters:
    """An integration's running counts (saved with a Lightning checkpoint). ``last_panic_step``
    is the trainer's optimizer-step count at the latest rollback, -1 before any."""

    rollbacks: int = 0
    scaler_skips: int = 0
    last_panic_step: int = -1
    last_panic_reason: str = ""


class GovernedRun:
    """Options now, a Governor and a hook once training starts (:meth:`start`).

    ``owner`` names the integration in error messages; ``governor_options`` are keyword options
    of :class:`TolariaGovernor` (``random_guess_loss``, ``sensitivity``, ...), checked by name here
    and by value when the Governor is built.

    Raises TypeError for an option the Governor does not take (or ``model``/``optimizer``, which
    the integration supplies) and ValueError for a count below 1.
    """

    def __init__(
        self,
        owner: str,
        *,
        snapshot_every: int = 10,
        scaler_overflow_limit: int = DEFAULT_SCALER_OVERFLOW_LIMIT,
        governor_options: dict[str, Any],
    ) -> None:
        accepted = governor_option_names()
        unknown = sorted(set(governor_options) - set(accepted))
        if unknown:
            raise TypeError(
                f"{owner} got unexpected option(s) {unknown}; it accepts snapshot_every, "
                f"scaler_overflow_limit and the TolariaGovernor options {list(accepted)} (the model and "
                "the optimizer come from the trainer)"
            )
        self.owner = owner
        self.snapshot_every = check_count("snapshot_every", snapshot_every)
        self.scaler_overflow_limit = check_count("scaler_overflow_limit", scaler_overflow_limit)
        self.governor_options = dict(governor_options)
        self.counters = RunCounters()
        self.grad_norm: float | None = None
        self.governor: TolariaGovernor | None = None
        self.hook: TrainerHook | None = None

    def start(
        self, model: nn.Module, optimizer: object, *, scaler: object = None, loss_scale: float = 1.0
    ) -> TrainerHook:
        """Build the Governor (it takes the first snapshot) and the hook for this training run."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.owner} needs a torch.nn.Module to watch, got {type(model).__name__}")
        self.governor = TolariaGovernor(model, optimizer=optimizer, **self.governor_options)  # type: ignore[arg-type]
        self.hook = TrainerHook(
            self.governor, optimizer, snapshot_every=self.snapshot_every, loss_scale=loss_scale,  # type: ignore[arg-type]
            scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            scaler_overflow_limit=self.scaler_overflow_limit, track_grad_norm=True,
        )  # fmt: skip
        return self.hook

    def judge(
        self,
        loss: torch.Tensor | float | None,
        *,
        last_micro_batch: bool,
        optimizer_step: int,
        loss_scale: float | None = None,
    ) -> StepOutcome:
        """:meth:`TrainerHook.after_backward`, counted: ``optimizer_step`` is the trainer's count of
        optimizer steps so far (reported as ``tolaria/last_panic``). Raises RuntimeError before
        :meth:`start`."""
        if self.hook is None:
            raise RuntimeError(f"{self.owner} judged a step before training started (no Governor yet)")
        outcome = self.hook.after_backward(loss, last_micro_batch=last_micro_batch, loss_scale=loss_scale)
        if outcome.rolled_back:
            self.counters.rollbacks += 1
            self.counters.last_panic_step = optimizer_step
            self.counters.last_panic_reason = outcome.panic_reason or ""
        if outcome.scaler_skipped:
            self.counters.scaler_skips += 1
        if outcome.grad_norm is not None:
            self.grad_norm = outcome.grad_norm
        return outcome

    def metrics(self) -> dict[str, float]:
        """The ``tolaria/*`` values to log now."""
        values = {
            "tolaria/rollbacks": float(self.counters.rollbacks),
            "tolaria/scaler_skips": float(self.counters.scaler_skips),
            "tolaria/last_panic": float(self.counters.last_panic_step),
        }
        if self.grad_norm is not None:
            values["tolaria/grad_norm"] = self.grad_norm
        return values

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.counters)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(RunCounters)}
        self.counters = RunCounters(**{k: v for k, v in state.items() if k in known})


class RunView:
    """What every integration shows of its :class:`GovernedRun` (``self.run``), written once."""

    run: GovernedRun

    @property
    def governor(self) -> Any:
        """The Governor of the current run (None before training starts)."""
        return self.run.governor

    @property
    def rollbacks(self) -> int:
        return self.run.counters.rollbacks

    @property
    def scaler_skips(self) -> int:
        return self.run.counters.scaler_skips

    @property
    def last_panic_reason(self) -> str:
        """The panic reason of the latest rollback ("" before any)."""
        return self.run.counters.last_panic_reason


__all__ = ["METRIC_NAMES", "GovernedRun", "RunCounters", "RunView", "governor_option_names"]
