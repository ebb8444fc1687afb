"""Snapshot and restore: what a user pays through the Governor, the stores alone, and the old way.

Workloads (:mod:`tolaria.bench.workloads`, fp32, the same tensors for every variant):
``many-small`` (5,000 small tensors) and ``gpt2-small`` (GPT-2 small's 148 shapes, ~0.5 GB).

Snapshot variants (time until the copy is complete and, for tolaria, verified and committed):

- ``pageable-clone``: the original Governor, ``{k: v.detach().cpu().clone() for k, v in
  model.state_dict().items()}`` every snapshot (the baseline);
- ``governor-snapshot``: ``TolariaGovernor(model).snapshot()``, the public path a user calls: the
  state-dict walk, the capture, the health check of the captured bytes and the commit. Each call
  first resolves the previous capture, as in training. On CUDA it is timed up to a device
  synchronize, so the side-stream copy is inside;
- store-level rows, the engines alone: ``pinned-per-key`` (the later Governor: per-key buffers
  allocated once, pinned on CUDA, ``copy_(non_blocking=True)`` and one synchronize),
  ``reference`` (ReferenceSnapshotStore) and ``native`` (NativeSnapshotStore). These get a dict
  of the model's named tensors built once before timing (no state-dict walk), so they show the
  engine's own cost; the walk is in ``governor-snapshot``;
- ``limit``: one copy of the same total bytes between two preallocated buffers (pinned on
  CUDA): the ceiling of this run.

On CUDA, ``native-host`` and ``governor-snapshot-host`` are the time ``capture()`` and
``governor.snapshot()`` block the host when the previous copy has long finished (as in training,
where the copy runs behind the next steps).

Restore variants: ``load-state-dict`` (the original: ``load_state_dict(strict=False)``; the
baseline), ``governor-rollback`` (``governor.execute_rollback()``: refusing an edited LKG, the
restore in place, one telemetry event), ``pinned-per-key``, ``reference``, ``native``, ``limit``.

Run ``python -m tolaria.bench.snapshot [--device cpu|cuda] [--quick]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tolaria import TolariaGovernor
from tolaria.bench import wording
from tolaria.bench.common import (
    Measurement,
    all_finished,
    device_label,
    measure,
    module_parser,
    percentile,
    print_report,
    release_cached_memory,
    synchronize,
)
from tolaria.bench.workloads import gpt2_small_shapes, many_small_model, parameter_module
from tolaria.snapshot.native import NativeSnapshotStore
from tolaria.snapshot.reference import ReferenceSnapshotStore

SNAPSHOT_BASELINE = "pageable-clone"
RESTORE_BASELINE = "load-state-dict"
LIMIT_NAME = "one copy of the same bytes"

Calls = tuple[Callable[[], object], Callable[[], object]]


@dataclass(frozen=True)
class Workload:
    """One model, and its named tensors gathered once for the store-level rows."""

    name: str
    model: nn.Module
    named: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.named.values())


def workload(name: str, model: nn.Module) -> Workload:
    return Workload(name, model, model.state_dict(keep_vars=True))


def many_small(device: str) -> Workload:
    return workload("many-small", many_small_model(device))


def gpt2_small(device: str) -> Workload:
    return workload("gpt2-small", parameter_module(gpt2_small_shapes(), device))


def _pinned_per_key(work: Workload, on_cuda: bool) -> Calls:
    """The later Governor: per-key host buffers allocated once, non_blocking copies, one sync."""
    buffers = {k: torch.empty_like(v, device="cpu", pin_memory=on_cuda) for k, v in work.named.items()}

    def snapshot() -> None:
        for key, value in work.model.state_dict().items():
            buffers[key].copy_(value.detach(), non_blocking=on_cuda)
        if on_cuda:
            torch.cuda.synchronize()

    def restore() -> None:
        with torch.no_grad():
            for key, value in work.named.items():
                value.copy_(buffers[key], non_blocking=on_cuda)
        if on_cuda:
            torch.cuda.synchronize()

    return snapshot, restore


def _limit(work: Workload, device: str, on_cuda: bool) -> Calls:
    """One copy of the same total bytes each way: the bandwidth ceiling of this run."""
    source = torch.empty(work.nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(work.nbytes, dtype=torch.uint8, pin_memory=on_cuda)
    return (lambda: host.copy_(source, non_blocking=on_cuda)), (
        lambda: source.copy_(host, non_blocking=on_cuda)
    )


def _store_calls(store: object, work: Workload) -> Calls:
    def snapshot() -> None:
        store.capture(work.named)  # type: ignore[attr-defined]
        resolution = store.resolve()  # type: ignore[attr-defined]
        assert resolution is not None and resolution.committed

    return snapshot, lambda: store.restore(work.named)  # type: ignore[attr-defined]


def governor_calls(work: Workload, device: str) -> tuple[TolariaGovernor, Calls]:
    """The public path: a Governor over the workload's model (its constructor takes the first
    snapshot), ``snapshot()`` and ``execute_rollback()``, each ending with the device idle."""
    governor = TolariaGovernor(work.model)
    first = governor.snapshot()
    if first.committed is False:
        raise RuntimeError(f"governor.snapshot() of {work.name} was not committed ({first.first_bad})")

    def snapshot() -> None:
        governor.snapshot()
        synchronize(device)

    def rollback() -> None:
        governor.execute_rollback()
        synchronize(device)

    return governor, (snapshot, rollback)


def _host_blocking(
    scenario: str,
    variant: str,
    call: Callable[[], object],
    device: str,
    warmup: int,
    reps: int,
    after: Callable[[], object] | None = None,
) -> Measurement:
    """Host seconds per ``call()`` when the device is idle before it (the previous copy long
    finished, as in training); the copy it starts, and ``after()``, run outside the timing."""
    samples = []
    for rep in range(warmup + reps):
        synchronize(device)
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        if after is not None:
            after()
        if rep >= warmup:
            samples.append(elapsed)
    synchronize(device)
    return Measurement(
        scenario, variant, device_label(device),
        percentile(samples, 0.5), percentile(samples, 0.1), percentile(samples, 0.9), reps,
    )  # fmt: skip


def workload_rows(work: Workload, device: str, quick: bool) -> list[Measurement]:
    """Every snapshot and restore variant of one workload (snapshots first, then restores)."""
    on_cuda = torch.device(device).type == "cuda"
    reps, warmup = (5, 1) if quick else (20, 3)
    nbytes = work.nbytes
    snapshot_scenario, restore_scenario = f"snapshot/{work.name}", f"restore/{work.name}"
    native = NativeSnapshotStore()
    governor, governor_pair = governor_calls(work, device)
    # (snapshot variant, restore variant, their calls); the Governor's public pair right after
    # the limit, before the store-level engines.
    variants: list[tuple[str, str, Calls]] = [
        ("limit", "limit", _limit(work, device, on_cuda)),
        ("governor-snapshot", "governor-rollback", governor_pair),
        ("pinned-per-key", "pinned-per-key", _pinned_per_key(work, on_cuda)),
        ("reference", "reference", _store_calls(ReferenceSnapshotStore(), work)),
        ("native", "native", _store_calls(native, work)),
    ]
    last: dict[str, torch.Tensor] = {}

    def pageable_clone() -> None:
        last.clear()
        last.update({k: v.detach().cpu().clone() for k, v in work.model.state_dict().items()})

    def load_state_dict() -> None:
        work.model.load_state_dict(last, strict=False)

    def timed(scenario: str, variant: str, call: Callable[[], object]) -> Measurement:
        return measure(scenario, variant, call, device=device, bytes=nbytes, warmup=warmup, reps=reps)

    snapshots = [timed(snapshot_scenario, SNAPSHOT_BASELINE, pageable_clone)]
    restores = [timed(restore_scenario, RESTORE_BASELINE, load_state_dict)]
    for snapshot_variant, restore_variant, (snapshot, restore) in variants:
        snapshots.append(timed(snapshot_scenario, snapshot_variant, snapshot))
        restores.append(timed(restore_scenario, restore_variant, restore))
    if on_cuda:
        # The store alone is resolved after each capture, untimed; governor.snapshot() resolves
        # the previous capture inside the call, as it does in training, so that is timed.
        snapshots.append(_host_blocking(snapshot_scenario, "native-host", lambda: native.capture(work.named),
                                        device, warmup, reps, after=native.resolve))  # fmt: skip
        snapshots.append(_host_blocking(snapshot_scenario, "governor-snapshot-host", governor.snapshot,
                                        device, warmup, reps))  # fmt: skip
    return snapshots + restores


def run(device: str, quick: bool) -> list[Measurement]:
    """Every workload on ``device`` ("cpu" or "cuda"); ``quick`` takes fewer repetitions."""
    rows: list[Measurement] = []
    for make in (many_small, gpt2_small):
        work = make(device)
        rows += workload_rows(work, device, quick)
        del work
        release_cached_memory(device)
    return rows


def summary(rows: list[Measurement]) -> list[str]:
    """The ratios the goals are stated in, one line each: the Governor's public calls first, then
    the native store alone."""
    by_key = {(row.scenario, row.variant): row for row in rows}
    lines = []
    for scenario in dict.fromkeys(row.scenario for row in rows):
        base = by_key.get((scenario, baseline_of(scenario)))
        limit = by_key.get((scenario, "limit"))
        public = "governor-snapshot" if scenario.startswith("snapshot/") else "governor-rollback"
        for variant, note in ((public, "the user's call"), ("native", "the store alone")):
            row = by_key.get((scenario, variant))
            if row is None:
                continue
            if base is not None:
                lines.append(wording.speed_line(scenario, base, row, note))
            if limit is not None:
                lines.append(wording.limit_line(scenario, limit, row, LIMIT_NAME))
        for variant in ("governor-snapshot-host", "native-host"):
            host = by_key.get((scenario, variant))
            if host is not None and base is not None:
                lines.append(wording.share_line(scenario, base, host, "blocks the host for"))
    return lines


def baseline_of(scenario: str) -> str:
    """The old way a snapshot or restore scenario is compared with."""
    return SNAPSHOT_BASELINE if scenario.startswith("snapshot/") else RESTORE_BASELINE


def main(argv: list[str] | None = None) -> None:
    args = module_parser(__doc__).parse_args(argv)
    logging.getLogger("tolaria").setLevel(logging.ERROR)  # a rollback per repetition: no event log
    rows = run(args.device, args.quick)
    title = f"snapshot and restore on {device_label(args.device)} (torch {torch.__version__})"
    print_report(title, rows, summary(rows), baseline_of)
    if not all_finished(rows):
        raise SystemExit("a measurement did not finish")


if __name__ == "__main__":
    main()
