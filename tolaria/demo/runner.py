"""The core of ``tolaria demo``: train a morphogenetic model, break it on schedule, watch it recover.

:func:`run_demo` is the whole demo as a function (no terminal needed): it builds the task's
model with one seed slot, trains it on the task's synthetic data through :class:`GuardedStep`,
grows a seed to FOSSILIZED along the way, injects the scheduled faults, and returns a
:class:`DemoResult`. Telemetry goes to ``<out_dir>/telemetry.jsonl`` for the duration of the run.
Presenting the run comes after it and is not done here: :mod:`tolaria.demo.report` draws the
loss plot (``<out_dir>/loss.png``, :func:`~tolaria.demo.report.write_plot`) and prints the
summary from the returned result, which is what ``tolaria demo`` does.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from tolaria import telemetry as tm
from tolaria.demo.faults import (
    DEFAULT_LR_BLOWUP_FACTOR,
    DEFAULT_LR_STORM_FACTOR,
    DEFAULT_LR_STORM_STEPS,
    FaultInjector,
    ScheduledFault,
    parse_fault_spec,
)
from tolaria.demo.results import DemoResult, FaultTracker
from tolaria.demo.twin import PlainTwin
from tolaria.environment import create_model, validate_device
from tolaria.governor import TolariaGovernor
from tolaria.guard import GuardedStep, StepOutcome
from tolaria.morphogenesis import MorphogeneticModel, SeedStage
from tolaria.recovery import RecoveryPolicy
from tolaria.tasks import TaskSpec, get_task_spec

#: Default ``--steps`` per task: ~15 s on an idle 2-core CPU, about a minute while other jobs share it.
DEFAULT_STEPS: dict[str, int] = {"cifar10": 400, "tinystories": 150}
FALLBACK_STEPS = 300
#: The seed the demo grows, per host kind: the cheapest blueprint of each.
SEED_BLUEPRINTS: dict[str, str] = {"cnn": "conv_light", "transformer": "lora"}
TELEMETRY_FILE = "telemetry.jsonl"
#: The demo's recovery policy: a storm of 100x needs two backoffs of 10x to be survivable.
DEMO_RECOVERY = RecoveryPolicy(lr_backoff=0.1, lr_recovery_steps=60, max_rollbacks=8)

#: ``on_step(outcome, last_event)``: called after every step (the CLI's progress bar).
StepCallback = Callable[[StepOutcome, str], None]


@dataclass(frozen=True)
class DemoConfig:
    """What to run. ``steps=None`` takes the task's :data:`DEFAULT_STEPS`; ``faults`` is a SPEC
    string (see :mod:`tolaria.demo.faults`) or an explicit schedule; ``batch_size=None`` takes the
    task's. ``recovery_window`` is the number of steps after a rollback that recovery is judged on."""

    task: str = "cifar10"
    device: str = "auto"
    steps: int | None = None
    faults: str | tuple[ScheduledFault, ...] = "default"
    out_dir: Path = Path("tolaria-demo-out")
    seed: int = 0
    snapshot_every: int = 10
    batch_size: int | None = None
    lr_blowup_factor: float = DEFAULT_LR_BLOWUP_FACTOR
    lr_storm_factor: float = DEFAULT_LR_STORM_FACTOR
    lr_storm_steps: int = DEFAULT_LR_STORM_STEPS
    recovery_window: int = 5
    recovery: RecoveryPolicy = DEMO_RECOVERY

    def resolved_steps(self) -> int:
        """``steps``, or the task's default; raises ValueError for steps < 1."""
        steps = self.steps if self.steps is not None else DEFAULT_STEPS.get(self.task, FALLBACK_STEPS)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return steps

    def schedule(self) -> tuple[ScheduledFault, ...]:
        """The fault schedule; raises FaultSpecError (a ValueError) for a bad SPEC or a step
        outside the run."""
        steps = self.resolved_steps()
        if isinstance(self.faults, str):
            return parse_fault_spec(self.faults, steps)
        return parse_fault_spec(",".join(str(fault) for fault in self.faults), steps) if self.faults else ()


class SeedLifecycle:
    """Grows one seed through its whole life on a fixed clock of ``every`` steps per epoch:
    germinate at ``start``, then TRAINING, BLENDING (three epochs of the blend ramp), HOLDING and
    FOSSILIZED — early in the run, so the fossil is in the Last Known Good before the first fault.

    A rollback prunes a seed that is still on trial; the lifecycle then stops and says so.
    """

    # Epoch index (counted from germination) → the stage entered then; other epochs only tick.
    _PLAN = {1: SeedStage.TRAINING, 2: SeedStage.BLENDING, 6: SeedStage.HOLDING, 7: SeedStage.FOSSILIZED}

    def __init__(
        self,
        model: MorphogeneticModel,
        optimizer: torch.optim.Optimizer,
        slot: str,
        blueprint: str,
        steps: int,
    ) -> None:
        self.model, self.optimizer, self.slot, self.blueprint = model, optimizer, slot, blueprint
        self.start = max(1, steps // 30)
        self.every = max(1, steps // 60)
        self.events: list[tuple[int, str]] = []
        self.finished = False

    def on_step(self, step: int) -> str | None:
        """Advance the lifecycle before ``step`` runs; returns what happened, if anything."""
        if self.finished or step < self.start or (step - self.start) % self.every:
            return None
        epoch = (step - self.start) // self.every
        if epoch == 0:
            state = self.model.germinate_seed(self.blueprint, slot=self.slot)
            # The seed's parameters are new: the optimizer must learn about them to train them.
            self.optimizer.add_param_group({"params": list(self.model.get_seed_parameters(self.slot))})
            return self._event(step, f"seed {state.seed_id} germinated in slot {self.slot}")
        self.model.step_epoch()
        target = self._PLAN.get(epoch)
        if target is None:
            return None
        self.model.advance_seed(slot=self.slot, target=target)
        self.finished = target == SeedStage.FOSSILIZED
        return self._event(step, f"seed in {self.slot} -> {target.name}")

    def after_rollback(self, step: int) -> str | None:
        """Notice a seed the Governor pruned during a rollback (it stops the lifecycle)."""
        if self.finished or self.model.get_slot(self.slot).stage not in (
            SeedStage.PRUNED,
            SeedStage.EMBARGOED,
        ):
            return None
        self.finished = True
        return self._event(step, f"seed in {self.slot} pruned by the rollback (it was still on trial)")

    def _event(self, step: int, text: str) -> str:
        self.events.append((step, text))
        return text


class _EventLog:
    """Collects the Governor's telemetry during the run: snapshot counts and the latest event."""

    def __init__(self) -> None:
        self.committed = 0
        self.rejected = 0
        self.last = "started"

    def __call__(self, event: tm.TelemetryEvent) -> None:
        data = event.data
        if isinstance(data, tm.GovernorSnapshotPayload):
            if data.committed:
                self.committed += 1
            else:
                self.rejected += 1
                self.last = "snapshot rejected"
        elif isinstance(data, tm.GovernorPanicPayload):
            sick = f" ({data.first_bad})" if data.first_bad else ""
            self.last = f"panic: {data.reason}{sick}"
        elif isinstance(data, tm.GovernorRollbackPayload):
            self.last = f"rolled back ({data.reason})"


def _forward_loss(
    spec: TaskSpec, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return spec.loss(model(inputs), targets)


def prepare_out_dir(path: Path) -> Path:
    """Create the output folder ``path`` (with its parents) and check that files can be written
    there, before any training; returns it. Raises ValueError saying why it cannot hold the
    demo's outputs (it is a file, it cannot be created, it is not writable)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError("it exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the folder ({error.strerror or error})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"the folder is not writable ({error.strerror or error})") from None
    return path


def run_demo(config: DemoConfig, *, on_step: StepCallback | None = None) -> DemoResult:
    """Run the demo described by ``config`` and return what it measured (nothing is printed or
    plotted here; see :mod:`tolaria.demo.report`).

    Everything is validated before training starts. Raises ValueError for an unknown task, a bad
    device string, steps < 1, a bad fault SPEC (FaultSpecError) or an output folder that cannot
    be created or written to; RuntimeError when the device does not exist here (e.g. ``cuda``
    without CUDA).
    """
    started = time.perf_counter()
    spec = get_task_spec(config.task)
    device = validate_device(config.device)
    steps = config.resolved_steps()
    schedule = config.schedule()

    out_dir = prepare_out_dir(Path(config.out_dir))
    telemetry_path = out_dir / TELEMETRY_FILE
    telemetry_path.unlink(missing_ok=True)  # JsonlSink appends; a demo's file holds one run

    torch.manual_seed(config.seed)
    slot = spec.slot_ids[min(1, len(spec.slot_ids) - 1)]
    model = create_model(config.task, device, slots=[slot])
    optimizer = spec.create_optimizer(model)
    result = DemoResult(
        config.task, str(device), steps, config.snapshot_every, spec.random_guess_loss, config.recovery_window
    )

    hub = tm.get_hub()
    events = _EventLog()
    jsonl = tm.JsonlSink(telemetry_path)
    sinks = [hub.add_sink(jsonl), hub.add_sink(tm.CallbackSink(events))]
    try:
        # Sinks first: the constructor's snapshot is the run's first event.
        governor = TolariaGovernor(
            model, optimizer=optimizer, random_guess_loss=spec.random_guess_loss, recovery=config.recovery
        )
        guard = GuardedStep(
            governor,
            optimizer,
            snapshot_every=config.snapshot_every,
            track_grad_norm=True,
            synchronize=device.type == "cuda",
        )
        injector = FaultInjector(
            model, optimizer, schedule, lr_blowup_factor=config.lr_blowup_factor,
            lr_storm_factor=config.lr_storm_factor, lr_storm_steps=config.lr_storm_steps,
        )  # fmt: skip
        twin: PlainTwin | None = None
        tracker = FaultTracker(spec.random_guess_loss, config.recovery_window)
        lifecycle = SeedLifecycle(model, optimizer, slot, SEED_BLUEPRINTS[model.host.kind], steps)
        batches = spec.batches(config.batch_size, seed=config.seed, device=device)
        for step in range(steps):
            if (seed_event := lifecycle.on_step(step)) is not None:
                events.last = seed_event
            inputs, targets = next(batches)
            fault = injector.inject(step)
            if fault is not None:
                record = tracker.on_inject(fault)
                result.injected[step] = fault.kind
                events.last = f"injected {fault.kind}"
                if fault.kind == "lr_storm":
                    # The control: the same storm from the same state, with plain rollbacks.
                    record.hold_until = step + config.lr_storm_steps
                    twin = PlainTwin(model, optimizer, injector.storm, step, governor,
                                     random_guess_loss=spec.random_guess_loss,
                                     snapshot_every=config.snapshot_every)  # fmt: skip
            if twin is not None:
                twin.step(step, partial(_forward_loss, spec, inputs=inputs, targets=targets))
                tracker.plain_rollbacks(twin.rollbacks, twin.rollback_steps)
                if not twin.active(step + 1):
                    twin = None
            try:
                outcome = guard(partial(_forward_loss, spec, model, inputs, targets))
            finally:
                injector.end_step()
            if outcome.rolled_back:
                injector.after_rollback()
                if (seed_event := lifecycle.after_rollback(step)) is not None:
                    events.last = seed_event
            tracker.on_outcome(outcome)
            result.outcomes.append(outcome)
            if on_step is not None:
                on_step(outcome, events.last)
        result.snapshot_backend = governor.snapshot_backend
        # Settle a capture still in flight (CUDA), so its event is counted.
        governor.resolve_snapshot()
    finally:
        for sink in sinks:
            hub.remove_sink(sink)
        jsonl.close()

    result.faults = tracker.finish()
    result.unattributed_rollbacks = tracker.unattributed_rollbacks
    result.snapshots_committed, result.snapshots_rejected = events.committed, events.rejected
    result.seed_events = lifecycle.events
    result.seed_stage = model.get_slot(slot).stage.name
    result.telemetry_path = telemetry_path
    result.wall_seconds = time.perf_counter() - started
    return result


__all__ = [
    "DEFAULT_STEPS",
    "SEED_BLUEPRINTS",
    "DemoConfig",
    "SeedLifecycle",
    "StepCallback",
    "prepare_out_dir",
    "run_demo",
]
