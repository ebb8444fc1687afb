"""Snapshot and restore benchmark: the native engine against the ways it replaces.

Scenarios (fp32, the same tensors for every variant):

- ``many-small``: an ``nn.Module`` of 2,500 ``Linear(8, 8)`` layers (5,000 small tensors);
- ``gpt2-small``: the 148 parameter shapes of GPT-2 small (124M parameters, ~0.5 GB) as a dict
  of ``nn.Parameter``.

Snapshot variants (time until the copy is complete and, for the stores, verified and committed):
``pageable-clone`` (the original Governor: ``{k: v.detach().clone().cpu()}`` over a fresh
``state_dict()`` every snapshot; the baseline), ``pinned-per-key`` (its later version: per-key
buffers allocated once, pinned on CUDA, ``copy_(non_blocking=True)`` and one synchronize),
``reference`` (ReferenceSnapshotStore), ``native`` (NativeSnapshotStore), ``limit`` (one copy
of the same total bytes between two preallocated buffers, pinned on CUDA: the ceiling). The
stores get the named tensors cached once, as the Governor keeps them (no state-dict walk). On
CUDA, ``native-host`` is the time ``capture()`` blocks the host (the copy runs on).

Restore variants: ``load-state-dict`` (the original: ``load_state_dict(strict=False)``, or
``copy_`` per key for the dict), ``pinned-per-key``, ``reference``, ``native``, ``limit``.

Run ``python -m bench.snapshot [--device cpu|cuda] [--quick]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import (
    Measurement,
    all_finished,
    device_label,
    measure,
    module_parser,
    percentile,
    print_report,
    ratio,
    release_cached_memory,
    synchronize,
)
from bench.health import gpt2_small_shapes
from tolaria.snapshot.native import NativeSnapshotStore
from tolaria.snapshot.reference import ReferenceSnapshotStore

SNAPSHOT_BASELINE = "pageable-clone"
RESTORE_BASELINE = "load-state-dict"


@dataclass
class Workload:
    """One model: how the original Governor read its state, and the named tensors cached once."""

    name: str
    state_dict: Callable[[], dict[str, torch.Tensor]]
    load: Callable[[dict[str, torch.Tensor]], object]
    named: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.named.values())


def many_small(device: str) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(2500)]).to(device)
    return Workload(
        "many-small",
        model.state_dict,
        lambda s: model.load_state_dict(s, strict=False),
        model.state_dict(keep_vars=True),
    )


def gpt2_small(device: str) -> Workload:
    generator = torch.Generator(device=device).manual_seed(0)
    params: dict[str, torch.Tensor] = {
        f"p{i}": nn.Parameter(torch.randn(shape, generator=generator, device=device) * 0.02)
        for i, shape in enumerate(gpt2_small_shapes())
    }

    def load(saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(saved[key])

    return Workload("gpt2-small", lambda: params, load, params)


def _pinned_per_key(work: Workload, on_cuda: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """The later Governor: per-key host buffers allocated once, non_blocking copies, one sync."""
    buffers = {k: torch.empty_like(v, device="cpu", pin_memory=on_cuda) for k, v in work.named.items()}

    def snapshot() -> None:
        for key, value in work.state_dict().items():
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


def _limit(work: Workload, device: str, on_cuda: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """One copy of the same total bytes each way: the bandwidth ceiling of this run."""
    source = torch.empty(work.nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(work.nbytes, dtype=torch.uint8, pin_memory=on_cuda)
    return (lambda: host.copy_(source, non_blocking=on_cuda)), (
        lambda: source.copy_(host, non_blocking=on_cuda)
    )


def _store_calls(store: object, work: Workload) -> tuple[Callable[[], object], Callable[[], object]]:
    def snapshot() -> None:
        store.capture(work.named)  # type: ignore[attr-defined]
        resolution = store.resolve()  # type: ignore[attr-defined]
        assert resolution is not None and resolution.committed

    return snapshot, lambda: store.restore(work.named)  # type: ignore[attr-defined]


def _host_blocking(
    store: NativeSnapshotStore, work: Workload, device: str, warmup: int, reps: int
) -> Measurement:
    """Host seconds per ``capture()`` when the previous capture has long finished (as in training)."""
    samples = []
    for rep in range(warmup + reps):
        synchronize(device)
        start = time.perf_counter()
        store.capture(work.named)
        elapsed = time.perf_counter() - start
        store.resolve()
        if rep >= warmup:
            samples.append(elapsed)
    return Measurement(
        f"snapshot/{work.name}", "native-host", device_label(device),
        percentile(samples, 0.5), percentile(samples, 0.1), percentile(samples, 0.9), reps,
    )  # fmt: skip


def _workload_rows(work: Workload, device: str, quick: bool) -> list[Measurement]:
    on_cuda = torch.device(device).type == "cuda"
    reps, warmup = (5, 1) if quick else (20, 3)
    nbytes = work.nbytes
    variants: list[tuple[str, tuple[Callable[[], object], Callable[[], object]]]] = [
        ("limit", _limit(work, device, on_cuda)),
        ("pinned-per-key", _pinned_per_key(work, on_cuda)),
        ("reference", _store_calls(ReferenceSnapshotStore(), work)),
    ]
    native = NativeSnapshotStore()
    variants.append(("native", _store_calls(native, work)))
    last: dict[str, torch.Tensor] = {}

    def pageable_clone() -> None:
        last.clear()
        last.update({k: v.detach().clone().cpu() for k, v in work.state_dict().items()})

    snapshots = [measure(f"snapshot/{work.name}", SNAPSHOT_BASELINE, pageable_clone, device=device,
                         bytes=nbytes, warmup=warmup, reps=reps)]  # fmt: skip
    restores = [measure(f"restore/{work.name}", RESTORE_BASELINE, lambda: work.load(last), device=device,
                        bytes=nbytes, warmup=warmup, reps=reps)]  # fmt: skip
    for variant, (snapshot, restore) in variants:
        snapshots.append(measure(f"snapshot/{work.name}", variant, snapshot, device=device,
                                 bytes=nbytes, warmup=warmup, reps=reps))  # fmt: skip
        restores.append(measure(f"restore/{work.name}", variant, restore, device=device,
                                bytes=nbytes, warmup=warmup, reps=reps))  # fmt: skip
    if on_cuda:
        snapshots.append(_host_blocking(native, work, device, warmup, reps))
    return snapshots + restores


def run(device: str, quick: bool) -> list[Measurement]:
    """Every workload on ``device`` ("cpu" or "cuda"); ``quick`` takes fewer repetitions."""
    rows: list[Measurement] = []
    for make in (many_small, gpt2_small):
        work = make(device)
        rows += _workload_rows(work, device, quick)
        del work
        release_cached_memory(device)
    return rows


def summary(rows: list[Measurement]) -> list[str]:
    """The ratios the goals are stated in, one line each."""
    by_key = {(row.scenario, row.variant): row for row in rows}
    lines = []
    for scenario in dict.fromkeys(row.scenario for row in rows):
        native = by_key.get((scenario, "native"))
        baseline = baseline_of(scenario)
        base, limit = by_key.get((scenario, baseline)), by_key.get((scenario, "limit"))
        if native is None:
            continue
        if base is not None:
            lines.append(f"{scenario}: native is {ratio(base, native):.1f}× faster than {baseline}")
        if limit is not None:
            lines.append(f"{scenario}: native reaches {ratio(limit, native):.0%} of the limit (one copy)")
        host = by_key.get((scenario, "native-host"))
        if host is not None and base is not None:
            lines.append(
                f"{scenario}: capture() blocks the host {host.median_s / base.median_s:.2%} of {baseline}"
            )
    return lines


def baseline_of(scenario: str) -> str:
    """The old way a snapshot or restore scenario is compared with."""
    return SNAPSHOT_BASELINE if scenario.startswith("snapshot/") else RESTORE_BASELINE


def main(argv: list[str] | None = None) -> None:
    args = module_parser(__doc__).parse_args(argv)
    rows = run(args.device, args.quick)
    title = f"snapshot and restore on {device_label(args.device)} (torch {torch.__version__})"
    print_report(title, rows, summary(rows), baseline_of)
    if not all_finished(rows):
        raise SystemExit("a measurement did not finish")


if __name__ == "__main__":
    main()
