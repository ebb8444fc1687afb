"""Host time of one guarded step's Governor calls: what the training thread pays per step.

On a GPU the checks run on the device; what the Python thread pays is the time it spends
inside the Governor's calls, launching, bookkeeping and (blocking mode) waiting for the
verdict. :class:`tolaria.GuardedStep` measures exactly that per step, in host seconds with no
device sync (``StepOutcome.governor_seconds``: the checks, the snapshot when due, a rollback).
This scenario runs guarded steps of each model below and reports, over the steps:

- ``guarded-deferred`` / ``guarded-blocking``: the median (p10, p90) of ``governor_seconds``
  over every step, one in K of them taking a snapshot;
- ``guarded-deferred-snapshot-steps`` / ``guarded-blocking-snapshot-steps``: the same over the
  steps that took a snapshot only.

- ``floor``: over the same steps, the least any per-step check of these tensors can cost in
  Python: reading each parameter's ``.grad`` and every parameter's and gradient's address once,
  the addresses as tolaria reads them (:func:`tolaria.addresses.addresses`: one C loop where
  torch's reader is bound), timed inside the optimizer's ``zero_grad``, before tolaria's calls
  of the step, so the caches are as a step leaves them. The Governor must ask at least that
  much every step to know that the tensors its cached plans read are still where they were.

Models: ``linear-2-tensors`` (one ``Linear(16, 16)``: what a step costs whatever the model;
the summary sets it beside the 292-tensor stack of the same layers to tell the fixed cost from
the cost per tensor), ``transformer-292-tensors`` (the CPU training scenario's 24-layer
transformer, 292 parameter tensors, so 584 tensors checked per step with their gradients; 5.3 MB
of weights), ``linear-stack-292-tensors`` (146 ``Linear(16, 16)`` layers: the same tensor count
in 0.16 MB, so on the CPU the model's data do not push tolaria's bookkeeping out of the caches,
as on a GPU host whose tensors live in device memory) and ``many-small-5000-tensors`` (2,500
``Linear(8, 8)`` layers: 5,000 parameter tensors).

On CUDA the checks run as they ship. On CPU the same device path runs on
:class:`tolaria.bench.fake_device.FakeDevice` (``health_backend="triton"``; the kernels are left
out, events have always completed), so the rows show the host side of a GPU step without a GPU.
Gradients: ``GuardedStep`` zeroes them with ``zero_grad(set_to_none=True)``, and on CUDA the
caching allocator hands the freed gradients back at the same addresses, as new tensor objects,
so every check finds its cached plan but must compare the new objects' metadata. On CPU they
would land elsewhere and every check would build a new plan, so there the optimizer wrapper
(:class:`ProbedOptimizer`, ``gradients="new-objects"``) zeroes them in place and hands each
parameter a new tensor object over the same memory: the CUDA case. The
``guarded-deferred-gradients-kept`` row zeroes them in place and keeps the objects
(``zero_grad(set_to_none=False)``, on either device), the case where a check can trust the
objects it has already compared. Without Triton there are no CPU rows.
"""

from __future__ import annotations

import contextlib
import time
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn

from tolaria import GuardedStep, StepOutcome, TolariaGovernor
from tolaria.addresses import addresses
from tolaria.bench import fake_device
from tolaria.bench.common import Measurement, device_label, percentile, release_cached_memory, synchronize
from tolaria.bench.training import CPU_TRANSFORMER, SNAPSHOT_EVERY, Batch, TrainingSetup, transformer_setup

MODES = ("guarded-blocking", "guarded-deferred")
KEPT = "guarded-deferred-gradients-kept"  # deferred, zero_grad(set_to_none=False)


def linear_stack_setup(name: str, layers: int, width: int, batch: int = 16) -> TrainingSetup:
    """``layers`` ``Linear(width, width)`` layers classifying random inputs into ``width`` classes."""

    def batches(generator: torch.Generator) -> list[Batch]:
        inputs = torch.randn(batch, width, generator=generator)
        return [(inputs, torch.randint(0, width, (batch,), generator=generator))]

    def model() -> nn.Module:  # built where the caller says (a device, or meta for sizes)
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])

    return TrainingSetup(name, model, batches)


def many_small_setup(
    name: str = "many-small-5000-tensors", layers: int = 2500, batch: int = 16
) -> TrainingSetup:
    """2,500 ``Linear(8, 8)`` layers: 5,000 tensors."""
    return linear_stack_setup(name, layers, 8, batch)


# The fixed part of the cost (what a step pays whatever the model) and the part that grows with
# the tensor count, told apart by two models of one kind: one Linear(16, 16), and 146 of them.
FIXED = ("linear-2-tensors", 2)
STACK = ("linear-stack-292-tensors", 292)


def setups() -> list[TrainingSetup]:
    return [
        linear_stack_setup(FIXED[0], layers=1, width=16),
        transformer_setup("transformer-292-tensors", CPU_TRANSFORMER, batch=4, tokens=32),
        linear_stack_setup(STACK[0], layers=146, width=16),
        many_small_setup(),
    ]


def _row(scenario: str, variant: str, device: str, samples: list[float]) -> Measurement:
    label = device_label(device)
    if torch.device(device).type != "cuda":
        label += ", fake device (kernels excluded)"
    return Measurement(scenario, variant, label, percentile(samples, 0.5),
                       percentile(samples, 0.1), percentile(samples, 0.9), len(samples))  # fmt: skip


_grad = attrgetter("grad")


def read_floor(params: tuple[torch.Tensor, ...]) -> float | None:
    """Seconds to read each parameter's address, its ``.grad`` and that gradient's address once
    (None while a parameter has no gradient): the ``floor`` row (see the module docstring)."""
    start = time.perf_counter()
    addresses(params)
    grads = tuple(map(_grad, params))
    try:
        addresses(grads)
    except TypeError:  # a None among them: no gradients yet
        return None
    return time.perf_counter() - start


GRADIENTS = ("freed", "new-objects", "kept")


class ProbedOptimizer:
    """Wraps an optimizer: ``zero_grad`` first times :func:`read_floor` over ``params`` (into
    ``floors``), then clears the gradients as ``gradients`` says: ``"freed"`` (set to None, as
    asked), ``"new-objects"`` (zeroed in place, then each a new tensor object over the same
    memory: what CUDA's allocator makes of freed gradients) or ``"kept"`` (zeroed in place, the
    same objects). See the module docstring. GuardedStep unwraps it like a trainer's."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, params: tuple[torch.Tensor, ...], gradients: str
    ) -> None:
        if gradients not in GRADIENTS:
            raise ValueError(f"gradients must be one of {GRADIENTS}, got {gradients!r}")
        self.optimizer = optimizer
        self.params = params
        self.gradients = gradients
        self.floors: list[float] = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        floor = read_floor(self.params)
        if floor is not None:
            self.floors.append(floor)
        self.optimizer.zero_grad(set_to_none=set_to_none and self.gradients == "freed")
        if self.gradients == "new-objects":
            for param in self.params:
                if param.grad is not None:  # backward adds into it in place: the address holds
                    param.grad = param.grad.detach()

    def step(self) -> None:
        self.optimizer.step()


def _guarded_steps(setup: TrainingSetup, device: str, deferred: bool, warmup: int, steps: int,
                   gradients_kept: bool = False) -> tuple[list[StepOutcome], list[float]]:  # fmt: skip
    """The outcomes of ``steps`` guarded steps after ``warmup``, and their floors."""
    torch.manual_seed(0)
    model = setup.model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    on_cuda = torch.device(device).type == "cuda"
    governor = TolariaGovernor(model, optimizer=optimizer, health_backend="auto" if on_cuda else "triton")
    gradients = "kept" if gradients_kept else "freed" if on_cuda else "new-objects"
    stepper = ProbedOptimizer(optimizer, tuple(model.parameters()), gradients)
    guard = GuardedStep(governor, stepper, snapshot_every=SNAPSHOT_EVERY, deferred=deferred)  # type: ignore[arg-type]
    inputs, targets = (t.to(device) for t in setup.batches(torch.Generator().manual_seed(0))[0])

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(inputs).float().flatten(0, -2), targets.flatten())

    outcomes = [guard(loss) for _ in range(warmup + steps)]
    synchronize(device)
    rolled_back = [o for o in outcomes if o.rolled_back]
    if rolled_back:
        raise RuntimeError(f"tolaria rolled back during the benchmark ({rolled_back[0].panic_reason})")
    return outcomes[warmup:], stepper.floors[-steps:]


def setup_rows(setup: TrainingSetup, device: str, quick: bool) -> list[Measurement]:
    """Both modes on one model, then deferred with the gradients kept: every step, and for the
    two modes the snapshot steps alone (on CPU inside
    :func:`tolaria.bench.fake_device.fake_device_checks`)."""
    steps = 2 * SNAPSHOT_EVERY if quick else 5 * SNAPSHOT_EVERY
    scenario = f"guard-host/{setup.name}"
    rows, floors = [], []
    on_cuda = torch.device(device).type == "cuda"
    for variant in (*MODES, KEPT):
        with contextlib.nullcontext() if on_cuda else fake_device.fake_device_checks():
            outcomes, floor = _guarded_steps(setup, device, variant != "guarded-blocking", SNAPSHOT_EVERY,
                                             steps, gradients_kept=variant == KEPT)  # fmt: skip
        floors += floor
        rows.append(_row(scenario, variant, device, [o.governor_seconds for o in outcomes]))
        snapshots = [o.governor_seconds for o in outcomes if o.snapshot is not None]
        if snapshots and variant in MODES:
            rows.append(_row(scenario, f"{variant}-snapshot-steps", device, snapshots))
        release_cached_memory(device)
    if floors:
        rows.append(_row(scenario, "floor", device, floors))
    return rows


def run(device: str, quick: bool) -> list[Measurement]:
    """Every model: on CUDA as they ship, on CPU through the fake device (nothing without Triton)."""
    if torch.device(device).type != "cuda" and not fake_device.available():
        return []
    return [row for setup in setups() for row in setup_rows(setup, device, quick)]


def summary(rows: list[Measurement]) -> list[str]:
    """Host microseconds per step inside the Governor, one line per model and mode, with its
    multiple of the floor of the same run where one was measured."""
    floors = {row.scenario: row.median_s for row in rows if row.variant == "floor"}
    lines = []
    for row in rows:
        if row.scenario.startswith("guard-host/") and row.variant in (*MODES, KEPT):
            line = (f"{row.scenario}: {row.variant} spends {row.median_s * 1e6:.1f} µs of host time per "
                    f"step in the Governor's calls (median; p90 {row.p90_s * 1e6:.1f} µs)")  # fmt: skip
            floor = floors.get(row.scenario)
            if floor:
                line += (f", {row.median_s / floor:.1f}× the floor of reading each tensor's .grad and "
                         f"address once ({floor * 1e6:.1f} µs)")  # fmt: skip
            lines.append(line)
    return lines + _split_lines(rows)


def _split_lines(rows: list[Measurement]) -> list[str]:
    """Per mode, the host time a step pays whatever the model (the 2-tensor model's median) and
    what each further tensor adds (the slope to the 292-tensor stack of the same layers)."""
    medians = {(row.scenario, row.variant): row.median_s for row in rows}
    lines = []
    for variant in (*MODES, KEPT):
        fixed = medians.get((f"guard-host/{FIXED[0]}", variant))
        stack = medians.get((f"guard-host/{STACK[0]}", variant))
        if fixed is None or stack is None:
            continue
        per_tensor = (stack - fixed) / (STACK[1] - FIXED[1])
        lines.append(f"guard-host: {variant} costs {fixed * 1e6:.1f} µs per step whatever the model "
                     f"({FIXED[0]}), and {per_tensor * 1e6:.2f} µs more per further tensor (the slope "
                     f"to {STACK[0]})")  # fmt: skip
    return lines


__all__ = [
    "FIXED",
    "GRADIENTS",
    "KEPT",
    "MODES",
    "ProbedOptimizer",
    "STACK",
    "linear_stack_setup",
    "many_small_setup",
    "read_floor",
    "run",
    "setup_rows",
    "setups",
    "summary",
]
