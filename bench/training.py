"""Training-loop and rollback scenarios: the step-time overhead of guarding a run.

Three loops train the same TransformerHost on the same batches in one process, interleaved
window by window so that drift (clocks, other load) hits them alike:

* ``unguarded``: forward, backward, optimizer step;
* ``legacy``: the original Governor's approach (:mod:`bench.legacy_governor`): loss-only
  vital signs, a per-tensor ``isfinite`` loop over the parameters every step, and a pageable
  ``state_dict`` clone every K steps;
* ``tolaria``: :class:`tolaria.GuardedStep` with ``deferred=True``: every step the loss and the
  fused health check of parameters and gradients are enqueued by ``governor.observe(loss)``
  and judged when their events have landed (no host sync on a healthy step), with a snapshot
  every K steps. ``_Loop(..., deferred=False)`` runs the blocking checks instead, for a side by
  side of the two paths.

A window is K steps, so each contains exactly one snapshot. Overhead = window time / the
unguarded window time − 1. The rollback scenario times ``execute_rollback()`` against the
legacy ``load_state_dict`` of a pageable snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import Measurement, device_label, measure, percentile, release_cached_memory, synchronize
from bench.legacy_governor import LegacyGovernor
from tolaria import GuardedStep, TolariaGovernor
from tolaria.morphogenesis.hosts import GPT2_SMALL, TransformerConfig, TransformerHost

SNAPSHOT_EVERY = 10
TRAINING_BASELINE = "unguarded"
ROLLBACK_BASELINE = "legacy-load-state-dict"


@dataclass(frozen=True)
class TrainingSetup:
    """Model size and batch for one device; GPT-2 small on CUDA, a small transformer on CPU."""

    config: TransformerConfig
    batch: int
    tokens: int
    name: str


def setup_for(device: str, quick: bool) -> TrainingSetup:
    if torch.device(device).type == "cuda":
        return TrainingSetup(GPT2_SMALL, batch=8, tokens=512 if quick else 1024, name="gpt2-small")
    config = TransformerConfig(vocab_size=8192, context_length=64, d_model=128, n_layers=2, n_heads=4)
    return TrainingSetup(config, batch=8, tokens=64, name="tiny-transformer")


class _Loop:
    """One model + optimizer + guard; ``window()`` runs K guarded steps. ``deferred`` picks the
    tolaria variant's checks: deferred (the default) or blocking."""

    def __init__(
        self,
        variant: str,
        setup: TrainingSetup,
        device: str,
        batches: list[torch.Tensor],
        *,
        deferred: bool = True,
    ) -> None:
        torch.manual_seed(0)
        self.variant = variant
        self.device = torch.device(device)
        self.model = TransformerHost.from_config(setup.config).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batches = batches
        self.cursor = 0
        self.legacy = LegacyGovernor(self.model) if variant == "legacy" else None
        self.guard: GuardedStep | None = None
        if variant == "tolaria":
            governor = TolariaGovernor(self.model, optimizer=self.optimizer)
            # Its snapshot clock starts at the constructor's snapshot: one more every K steps,
            # i.e. on the last step of every window.
            self.guard = GuardedStep(
                governor, self.optimizer, snapshot_every=SNAPSHOT_EVERY, deferred=deferred
            )
        # bf16 autocast on CUDA, as a GPT-2 run would train; fp32 on CPU.
        self.autocast = self.device.type == "cuda"

    def _loss(self) -> torch.Tensor:
        tokens = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    def step(self, snapshot: bool) -> None:
        if self.guard is not None:  # snapshots on its own clock, every K steps
            outcome = self.guard(self._loss)
            if outcome.rolled_back:
                raise RuntimeError(f"tolaria rolled back during the benchmark ({outcome.panic_reason})")
            return
        loss = self._loss()
        if self.legacy is not None and self.legacy.check_vital_signs(loss):
            raise RuntimeError("legacy governor panicked during the benchmark")
        self.optimizer.zero_grad(set_to_none=True)
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


def training_rows(device: str, quick: bool, progress: Callable[[], None] | None = None) -> list[Measurement]:
    """Per-step time of the three loops (median over interleaved windows of K steps)."""
    setup = setup_for(device, quick)
    generator = torch.Generator().manual_seed(0)
    shape = (setup.batch, setup.tokens + 1)
    vocab = setup.config.vocab_size
    batches = [torch.randint(0, vocab, shape, generator=generator).to(device) for _ in range(4)]
    loops = [_Loop(v, setup, device, batches) for v in (TRAINING_BASELINE, "legacy", "tolaria")]
    windows = 3 if quick else 8
    for loop in loops:  # warm-up: allocator, autotuning, the first snapshot's arena
        loop.window()
    samples: dict[str, list[float]] = {loop.variant: [] for loop in loops}
    for _ in range(windows):
        for loop in loops:
            samples[loop.variant].append(_time_window(loop) / SNAPSHOT_EVERY)
        if progress is not None:
            progress()
    scenario = f"training-step/{setup.name}"
    label = device_label(device)
    rows = []
    for loop in loops:
        times = samples[loop.variant]
        rows.append(Measurement(scenario, loop.variant, label, percentile(times, 0.5), percentile(times, 0.1),
                                percentile(times, 0.9), len(times)))  # fmt: skip
    del loops
    release_cached_memory(device)
    return rows


def rollback_rows(device: str, quick: bool) -> list[Measurement]:
    """``execute_rollback()`` end to end next to the legacy pageable ``load_state_dict``."""
    setup = setup_for(device, quick)
    model = TransformerHost.from_config(setup.config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nbytes = sum(t.nbytes for t in model.state_dict().values())
    legacy = LegacyGovernor(model)
    legacy.snapshot()
    governor = TolariaGovernor(model, optimizer=optimizer)
    governor.snapshot()
    reps, warmup = (5, 1) if quick else (20, 3)
    scenario = f"rollback/{setup.name}"
    return [
        measure(scenario, ROLLBACK_BASELINE, legacy.execute_rollback, device=device, bytes=nbytes,
                warmup=warmup, reps=reps),
        measure(scenario, "tolaria", lambda: governor.execute_rollback(), device=device, bytes=nbytes,
                warmup=warmup, reps=reps),
    ]  # fmt: skip


def summary(rows: list[Measurement]) -> list[str]:
    """Overheads (training) and speed-ups (rollback), one line each."""
    by_key = {(row.scenario, row.variant): row for row in rows}
    lines = []
    for scenario in dict.fromkeys(row.scenario for row in rows):
        if scenario.startswith("training-step/"):
            base = by_key[(scenario, TRAINING_BASELINE)]
            for variant in ("legacy", "tolaria"):
                row = by_key.get((scenario, variant))
                if row is not None:
                    overhead = row.median_s / base.median_s - 1
                    lines.append(
                        f"{scenario}: {variant} adds {overhead:+.1%} to the step time "
                        f"(health every step, snapshot every {SNAPSHOT_EVERY} steps)"
                    )
        elif scenario.startswith("rollback/"):
            legacy, ours = by_key.get((scenario, ROLLBACK_BASELINE)), by_key.get((scenario, "tolaria"))
            if legacy is not None and ours is not None:
                lines.append(f"{scenario}: tolaria's rollback is {legacy.median_s / ours.median_s:.1f}× "
                             f"the speed of the legacy load_state_dict")  # fmt: skip
    return lines
