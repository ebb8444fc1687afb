"""The guarded training step and rollback: what guarding a run costs, through the public API.

Four loops train the same model on the same batches in one process, interleaved so that drift
(clocks, other load) hits them alike: on CPU step by step (step 1 of each loop, then step 2, ...),
on CUDA window by window:

* ``unguarded``: zero the gradients, forward, backward, optimizer step (the baseline);
* ``legacy``: the original Governor's approach (:mod:`tolaria.bench.legacy_governor`): loss-only
  vital signs, a per-tensor ``isfinite`` loop over the parameters every step, and a pageable
  ``state_dict`` clone every K steps;
* ``guarded-blocking``: :class:`tolaria.GuardedStep` as it ships (``deferred=False``): the loss
  and the health of weights and gradients judged every step before the optimizer steps, a
  snapshot every K steps;
* ``guarded-deferred``: ``GuardedStep(deferred=True)``: ``governor.observe(loss)`` enqueues the
  same checks with no host sync; their verdicts are judged when they land (at once on CPU).

A window is K steps, so each holds exactly one snapshot; a step's time is its window's over K.
Overhead is paired: per round, a loop's window time / the unguarded window of the same round − 1,
and the median (p10, p90) of that over the rounds (:attr:`Measurement.paired`), so drift that
slows a whole round cancels out (with the run's noise, see :mod:`tolaria.bench.wording`). There
is no physical limit to hold a step against; instead each scenario gets computed byte counts
(:func:`bytes_read`): what ``clip_grad_norm_``, tolaria's check and the two together read per
step, from tensor sizes, not timed.

Models: GPT-2 small (bf16 autocast, as it would train) on CUDA; on CPU a 24-layer transformer
(292 parameter tensors) and a two-layer MLP (4 parameter tensors), the two sizes the CPU goals
name. The rollback scenario times ``execute_rollback()`` (with AdamW state) against the
original's ``load_state_dict`` of a pageable snapshot, on the first model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tolaria import GuardedStep, TolariaGovernor
from tolaria.bench import wording
from tolaria.bench.common import (
    ByteCount,
    Measurement,
    device_label,
    measure,
    paired_overhead,
    percentile,
    release_cached_memory,
    synchronize,
)
from tolaria.bench.legacy_governor import LegacyGovernor
from tolaria.morphogenesis.hosts import GPT2_SMALL, TransformerConfig, TransformerHost

SNAPSHOT_EVERY = 10
TRAINING_BASELINE = "unguarded"
ROLLBACK_BASELINE = "legacy-load-state-dict"
GUARDED = ("guarded-blocking", "guarded-deferred")
VARIANTS = (TRAINING_BASELINE, "legacy", *GUARDED)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainingSetup:
    """One model and its batches. ``model()`` builds it (seeded: every loop gets the same
    weights); ``batches(generator)`` returns CPU ``(inputs, targets)`` pairs; ``autocast``
    trains in bf16 autocast on CUDA."""

    name: str
    model: Callable[[], nn.Module]
    batches: Callable[[torch.Generator], list[Batch]]
    autocast: bool = False


def transformer_setup(name: str, config: TransformerConfig, batch: int, tokens: int, autocast: bool = False
                      ) -> TrainingSetup:  # fmt: skip
    """Next-token prediction on random tokens: ``batch`` sequences of ``tokens`` tokens."""

    def batches(generator: torch.Generator) -> list[Batch]:
        sequences = [torch.randint(0, config.vocab_size, (batch, tokens + 1), generator=generator)
                     for _ in range(4)]  # fmt: skip
        return [(s[:, :-1], s[:, 1:]) for s in sequences]

    return TrainingSetup(name, lambda: TransformerHost.from_config(config), batches, autocast)


def mlp_setup(name: str, features: int = 784, hidden: int = 256, classes: int = 10, batch: int = 64
              ) -> TrainingSetup:  # fmt: skip
    """Classification of random inputs by ``Linear, ReLU, Linear``: 4 parameter tensors."""

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def batches(generator: torch.Generator) -> list[Batch]:
        return [(torch.randn(batch, features, generator=generator),
                 torch.randint(0, classes, (batch,), generator=generator)) for _ in range(4)]  # fmt: skip

    return TrainingSetup(name, model, batches)


#: The CPU models: the tensor counts the CPU overhead goals are stated at.
CPU_TRANSFORMER = TransformerConfig(vocab_size=2048, context_length=32, d_model=64, n_layers=24, n_heads=4)


def setups_for(device: str, quick: bool) -> list[TrainingSetup]:
    """GPT-2 small on CUDA; on CPU the 292-tensor transformer and the 4-tensor MLP."""
    if torch.device(device).type == "cuda":
        return [transformer_setup("gpt2-small", GPT2_SMALL, batch=8, tokens=512 if quick else 1024,
                                  autocast=True)]  # fmt: skip
    return [
        transformer_setup("transformer-292-tensors", CPU_TRANSFORMER, batch=4, tokens=32),
        mlp_setup("mlp-4-tensors"),
    ]


class _Loop:
    """One model + optimizer (+ the variant's guard); ``window()`` runs K steps."""

    def __init__(self, variant: str, setup: TrainingSetup, device: str, batches: list[Batch]) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        torch.manual_seed(0)
        self.variant = variant
        self.device = torch.device(device)
        self.model = setup.model().to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batches = batches
        self.cursor = 0
        self.legacy = LegacyGovernor(self.model) if variant == "legacy" else None
        self.guard: GuardedStep | None = None
        if variant in GUARDED:
            governor = TolariaGovernor(self.model, optimizer=self.optimizer)
            # Its snapshot clock starts at the constructor's snapshot: one more every K steps,
            # i.e. on the last step of every window.
            self.guard = GuardedStep(governor, self.optimizer, snapshot_every=SNAPSHOT_EVERY,
                                     deferred=variant == "guarded-deferred")  # fmt: skip
        self.autocast = setup.autocast and self.device.type == "cuda"

    def _loss(self) -> torch.Tensor:
        inputs, targets = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(inputs)
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())

    def step(self, snapshot: bool) -> None:
        if self.guard is not None:  # snapshots on its own clock, every K steps
            outcome = self.guard(self._loss)
            if outcome.rolled_back:
                raise RuntimeError(f"tolaria rolled back during the benchmark ({outcome.panic_reason})")
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss()
        if self.legacy is not None and self.legacy.check_vital_signs(loss):
            raise RuntimeError("legacy governor panicked during the benchmark")
        loss.backward()
        if self.legacy is not None and not self.legacy.parameters_finite():
            raise RuntimeError("legacy governor found non-finite parameters")
        self.optimizer.step()
        if snapshot and self.legacy is not None:
            self.legacy.snapshot()

    def window(self) -> None:
        for index in range(SNAPSHOT_EVERY):
            self.step(snapshot=index == SNAPSHOT_EVERY - 1)


def _time_window(loop: _Loop) -> float:
    synchronize(loop.device)
    if loop.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loop.window()
        end.record()
        torch.cuda.synchronize(loop.device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    loop.window()
    return time.perf_counter() - begin


def _interleaved_windows(loops: list[_Loop]) -> list[float]:
    """CPU: one window of every loop, step by step in turn (step 1 of each loop, then step 2, ...),
    each step timed alone; returns each loop's window time. Drift then hits the loops within tens
    of milliseconds of each other instead of a window apart, which is what pairs them."""
    totals = [0.0] * len(loops)
    for index in range(SNAPSHOT_EVERY):
        for position, loop in enumerate(loops):
            begin = time.perf_counter()
            loop.step(snapshot=index == SNAPSHOT_EVERY - 1)
            totals[position] += time.perf_counter() - begin
    return totals


def _batches_on(setup: TrainingSetup, device: str) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    return [(inputs.to(device), targets.to(device)) for inputs, targets in setup.batches(generator)]


def setup_rows(
    setup: TrainingSetup,
    device: str,
    quick: bool,
    *,
    fewest: int | None = None,
    budget_s: float | None = None,
) -> list[Measurement]:
    """Per-step time of the four loops on one setup: median (p10, p90) over interleaved windows of
    K steps; at least ``fewest`` rounds of windows (default 6, 10 without ``quick``), more while a
    time budget of ``budget_s`` seconds of timed windows lasts (default 3 s, 10 s), at most 30 (100).
    Each row but the baseline's also carries its overhead paired round by round with the
    baseline's window of the same round (:attr:`Measurement.paired`)."""
    batches = _batches_on(setup, device)
    loops = [_Loop(variant, setup, device, batches) for variant in VARIANTS]
    default_fewest, most, default_budget = (6, 30, 3.0) if quick else (10, 100, 10.0)
    fewest = default_fewest if fewest is None else fewest
    budget_s = default_budget if budget_s is None else budget_s
    for loop in loops:  # warm-up: allocator, autotuning, the first snapshot's arena
        loop.window()
    samples: dict[str, list[float]] = {loop.variant: [] for loop in loops}
    # At least `fewest` rounds; more while the budget lasts, so a small model whose step takes
    # milliseconds gets enough windows for a p10-p90 spread that means something.
    spent, rounds = 0.0, 0
    on_cuda = torch.device(device).type == "cuda"
    while rounds < fewest or (rounds < most and spent < budget_s):
        # CUDA: each window timed whole with events (a per-step sync would undo the deferred mode).
        windows = [_time_window(loop) for loop in loops] if on_cuda else _interleaved_windows(loops)
        for loop, seconds in zip(loops, windows, strict=True):
            spent += seconds
            samples[loop.variant].append(seconds / SNAPSHOT_EVERY)
        rounds += 1
    scenario, label = f"training-step/{setup.name}", device_label(device)
    base = samples[TRAINING_BASELINE]
    rows = [
        Measurement(scenario, variant, label, percentile(times, 0.5), percentile(times, 0.1),
                    percentile(times, 0.9), len(times),
                    paired=None if variant == TRAINING_BASELINE else paired_overhead(times, base))
        for variant, times in samples.items()
    ]  # fmt: skip
    del loops
    release_cached_memory(device)
    return rows


def training_rows(device: str, quick: bool) -> list[Measurement]:
    """The four loops on every setup of ``device``."""
    rows: list[Measurement] = []
    for setup in setups_for(device, quick):
        rows += setup_rows(setup, device, quick)
    return rows


def bytes_read(setup: TrainingSetup) -> list[ByteCount]:
    """Device bytes one step's checks read, computed from the model's tensor sizes (fp32
    gradients of the trainable parameters): ``clip_grad_norm_`` reads every gradient once,
    tolaria's check every weight and every gradient once, the two in a row the gradients twice."""
    with torch.device("meta"):  # sizes only: nothing is allocated or initialized
        model = setup.model()
    weights = sum(p.nbytes for p in model.parameters())
    grads = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    scenario = f"training-step/{setup.name}"
    return [
        ByteCount(scenario, "clip_grad_norm_", grads, "every gradient once"),
        ByteCount(scenario, "tolaria-check", weights + grads, "every weight and every gradient once"),
        ByteCount(scenario, "clip_grad_norm_ + tolaria-check", weights + 2 * grads,
                  "every gradient twice (the clip, then the check) and every weight once"),
    ]  # fmt: skip


def accounting(device: str, quick: bool) -> list[ByteCount]:
    """:func:`bytes_read` of every setup of ``device``."""
    return [count for setup in setups_for(device, quick) for count in bytes_read(setup)]


def rollback_rows(device: str, quick: bool) -> list[Measurement]:
    """``execute_rollback()`` end to end (AdamW state included) next to the original's pageable
    ``load_state_dict``, on the first training model of ``device``."""
    setup = setups_for(device, quick)[0]
    torch.manual_seed(0)
    model = setup.model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # One step on zero gradients, so AdamW has its moments and step count to capture and restore.
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    nbytes = sum(t.nbytes for t in model.state_dict().values())
    legacy = LegacyGovernor(model)
    legacy.snapshot()
    governor = TolariaGovernor(model, optimizer=optimizer)
    reps, warmup = (5, 1) if quick else (20, 3)
    scenario = f"rollback/{setup.name}"
    return [
        measure(scenario, ROLLBACK_BASELINE, legacy.execute_rollback, device=device, bytes=nbytes,
                warmup=warmup, reps=reps),
        measure(scenario, "governor-rollback", lambda: governor.execute_rollback(), device=device,
                bytes=nbytes, warmup=warmup, reps=reps),
    ]  # fmt: skip


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def summary(rows: list[Measurement], counts: list[ByteCount] | None = None) -> list[str]:
    """Overheads (training), speed-ups (rollback) and byte counts, one line each."""
    by_key = {(row.scenario, row.variant): row for row in rows}
    lines = []
    for scenario in dict.fromkeys(row.scenario for row in rows):
        if scenario.startswith("training-step/"):
            base = by_key.get((scenario, TRAINING_BASELINE))
            for variant in ("legacy", *GUARDED):
                row = by_key.get((scenario, variant))
                if row is not None and base is not None:
                    lines.append(wording.overhead_line(scenario, base, row, f"the step (health every step, "
                                                       f"snapshot every {SNAPSHOT_EVERY})"))  # fmt: skip
        elif scenario.startswith("rollback/"):
            legacy, ours = (
                by_key.get((scenario, ROLLBACK_BASELINE)),
                by_key.get((scenario, "governor-rollback")),
            )
            if legacy is not None and ours is not None:
                lines.append(wording.speed_line(scenario, legacy, ours, "AdamW state included"))
    for scenario in dict.fromkeys(count.scenario for count in counts or ()):
        parts = [f"{c.variant} {_megabytes(c.bytes)}" for c in counts or () if c.scenario == scenario]
        lines.append(f"{scenario}: bytes read per step, computed from tensor sizes (not measured): "
                     + "; ".join(parts))  # fmt: skip
    return lines


__all__ = [
    "GUARDED",
    "ROLLBACK_BASELINE",
    "SNAPSHOT_EVERY",
    "TRAINING_BASELINE",
    "VARIANTS",
    "TrainingSetup",
    "accounting",
    "bytes_read",
    "mlp_setup",
    "rollback_rows",
    "setup_rows",
    "setups_for",
    "summary",
    "training_rows",
    "transformer_setup",
]
