"""Timing shared by tolaria's benchmarks: warm-up, repetitions, median and p10/p90, tables.

Every claim is a ratio of two measurements taken side by side in one process (see
docs/architecture.md, "Testing and measuring"). On CUDA a repetition is timed with CUDA events
around the call and the device is synchronized before its time is read, so queued work is never missed; on CPU
it is wall time from ``time.perf_counter``. :func:`time_host` instead times only the host side
of calls that enqueue work (the host cost of an asynchronous check).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Measurement:
    """One timed variant of one scenario; times in seconds, ``bytes`` read or moved per call.

    ``paired``: for a variant timed in rounds interleaved with its baseline (the training
    step), the median, p10 and p90 over the rounds of (this round's time / the baseline's time
    in the same round) − 1: drift that slows a whole round cancels out of each ratio."""

    scenario: str
    variant: str
    device: str
    median_s: float
    p10_s: float
    p90_s: float
    reps: int
    bytes: int = 0
    paired: tuple[float, float, float] | None = None

    @property
    def gbps(self) -> float | None:
        """Throughput in GB/s (1e9 bytes) at the median, when ``bytes`` is known."""
        return self.bytes / self.median_s / 1e9 if self.bytes and self.median_s > 0 else None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ByteCount:
    """Bytes one step reads, computed from tensor sizes (``numel * element_size``), not timed.

    ``scenario``/``variant`` name it like a :class:`Measurement`; ``basis`` says what was
    counted (e.g. "every gradient once"), so a reader never takes it for a measurement.
    """

    scenario: str
    variant: str
    bytes: int
    basis: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def paired_overhead(samples: Sequence[float], baseline: Sequence[float]) -> tuple[float, float, float]:
    """Median, p10 and p90 of ``samples[i] / baseline[i] − 1``, round by round."""
    ratios = [value / base - 1 for value, base in zip(samples, baseline, strict=True)]
    return percentile(ratios, 0.5), percentile(ratios, 0.1), percentile(ratios, 0.9)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile of ``samples`` (``fraction`` in [0, 1])."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("percentile of no samples")
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release_cached_memory(device: str | torch.device) -> None:
    """Between workloads on CUDA: hand the caching allocator's free blocks back, so the next
    workload's allocations (pinned arenas, large tensors) start from the same state."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def time_calls(
    fn: Callable[[], object], *, device: str | torch.device, warmup: int = 3, reps: int = 20
) -> list[float]:
    """Seconds per call of ``fn``, ``reps`` samples after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if torch.device(device).type != "cuda":
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return samples
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
    ]
    for start_event, end_event in events:
        start_event.record()
        fn()
        end_event.record()
    torch.cuda.synchronize(device)
    return [start_event.elapsed_time(end_event) / 1e3 for start_event, end_event in events]


def time_host(
    fn: Callable[[], object], *, device: str | torch.device, warmup: int = 3, reps: int = 50
) -> list[float]:
    """Host seconds per call of ``fn`` without waiting for the device between calls.

    Keep ``reps`` well below the launch queue depth (about a thousand kernels) so the host never
    stalls on a full queue; the device is synchronized once after the last call.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    synchronize(device)
    return samples


def measure(
    scenario: str,
    variant: str,
    fn: Callable[[], object],
    *,
    device: str | torch.device,
    bytes: int = 0,
    warmup: int = 3,
    reps: int = 20,
    host_only: bool = False,
) -> Measurement:
    """Time ``fn`` (device time, or host time with ``host_only``) into a :class:`Measurement`."""
    timer = time_host if host_only else time_calls
    samples = timer(fn, device=device, warmup=warmup, reps=reps)
    return Measurement(
        scenario=scenario,
        variant=variant,
        device=device_label(device),
        median_s=percentile(samples, 0.5),
        p10_s=percentile(samples, 0.1),
        p90_s=percentile(samples, 0.9),
        reps=reps,
        bytes=bytes,
    )


def ratio(baseline: Measurement, candidate: Measurement) -> float:
    """How many times faster ``candidate`` is than ``baseline`` (ratio of medians)."""
    return baseline.median_s / candidate.median_s


def device_label(device: str | torch.device) -> str:
    """A device named the way results should be read: the GPU model, or CPU and its threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def _format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def markdown_table(rows: Sequence[Measurement], *, baselines: dict[str, str] | None = None) -> str:
    """A markdown table of ``rows``; ``baselines`` maps a scenario to the variant its ratios use."""
    baselines = baselines or {}
    by_key = {(row.scenario, row.variant): row for row in rows}
    lines = [
        "| scenario | variant | device | median | p10 | p90 | GB/s | speed-up |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = by_key.get((row.scenario, baselines.get(row.scenario, "")))
        speedup = f"{ratio(base, row):.2f}×" if base is not None else ""
        gbps = f"{row.gbps:.1f}" if row.gbps is not None else ""
        lines.append(
            f"| {row.scenario} | {row.variant} | {row.device} | {_format_seconds(row.median_s)} | "
            f"{_format_seconds(row.p10_s)} | {_format_seconds(row.p90_s)} | {gbps} | {speedup} |"
        )
    return "\n".join(lines)


def module_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every ``python -m tolaria.bench.<scenario>`` shares: ``--device`` and ``--quick``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    return parser


def print_report(
    title: str,
    rows: Sequence[Measurement],
    lines: Sequence[str],
    baseline_of: Callable[[str], str],
    sections: Sequence[tuple[str, Sequence[str]]] = (),
) -> None:
    """Ratios first, then each extra ``(heading, lines)`` section, then the table of absolute
    times (each row's speed-up against its baseline)."""
    print(f"# {title}\n")
    print("## Ratios\n")
    print("\n".join(f"- {line}" for line in lines))
    for heading, section in sections:
        print(f"\n## {heading}\n")
        print("\n".join(f"- {line}" for line in section))
    print("\n## Measurements\n")
    print(markdown_table(rows, baselines={row.scenario: baseline_of(row.scenario) for row in rows}))


def all_finished(rows: Sequence[Measurement]) -> bool:
    """False when a measurement did not produce a finite time."""
    return all(math.isfinite(row.median_s) for row in rows)
