"""The goals of issue #18, judged on a bench run: one verdict line per goal.

A verdict is a measurement read against a target, never a test assertion: the bench prints
them, ``bench/gpu_check.sh`` prints them last, and nothing fails because one is missed. The
input is the bench's ``bench.json`` (its ``rows``; ``device_type`` says where it ran), so
``python -m tolaria.bench.goals bench.json`` judges a run filed long ago, from any machine.

A goal is judged on the median. Where the target lies inside the run's p10–p90 spread (the
ratio at the two ends of both rows' ranges), the verdict says so: that run cannot settle it.
Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"


@dataclass(frozen=True)
class _Row:
    median_s: float
    p10_s: float
    p90_s: float
    paired: tuple[float, float, float] | None = None  # per-round overhead: median, p10, p90


@dataclass(frozen=True)
class Goal:
    """One target. ``kind``: ``"speed"`` (baseline time / candidate time >= ``target``),
    ``"share"`` (candidate / baseline <= ``target``), ``"host-seconds"`` (candidate median <=
    ``target`` seconds) or ``"overhead"`` (candidate / baseline − 1 <= ``target`` for every
    variant in ``candidates``). ``device_type``: where it is judged (None: wherever the run was)."""

    name: str
    text: str
    kind: str
    scenario: str
    candidates: tuple[str, ...]
    target: float
    baseline: str = ""
    device_type: str | None = None


@dataclass(frozen=True)
class Verdict:
    goal: Goal
    status: str
    measured: str = ""
    note: str = ""

    def line(self) -> str:
        parts = [f"[{self.status}] {self.goal.text}"]
        if self.measured:
            parts.append(f"measured {self.measured}")
        if self.note:
            parts.append(self.note)
        return " — ".join(parts)


GOALS: tuple[Goal, ...] = (
    Goal("snapshot-many-small-cpu", "governor.snapshot(), 5,000 small tensors, CPU: >= 5× the pageable clone",
         "speed", "snapshot/many-small", ("governor-snapshot",), 5.0, "pageable-clone", "cpu"),
    Goal("snapshot-gpt2-small", "governor.snapshot(), GPT-2-small shapes: >= 1× the pageable clone",
         "speed", "snapshot/gpt2-small", ("governor-snapshot",), 1.0, "pageable-clone"),
    Goal("snapshot-host-blocking-cuda",
         "governor.snapshot() host-blocking, GPT-2-small shapes, CUDA: <= 2 % of the pageable clone",
         "share", "snapshot/gpt2-small", ("governor-snapshot-host",), 0.02, "pageable-clone", "cuda"),
    Goal("guard-host-300-cuda",
         "host time of one guarded step's Governor calls, deferred, 292 tensors, CUDA: <= 30 µs",
         "host-seconds", "guard-host/transformer-292-tensors", ("guarded-deferred",), 30e-6, "", "cuda"),
    Goal("guard-host-5000-cuda",
         "host time of one guarded step's Governor calls, deferred, 5,000 tensors, CUDA: <= 300 µs",
         "host-seconds", "guard-host/many-small-5000-tensors", ("guarded-deferred",), 300e-6, "", "cuda"),
    Goal("guard-host-300-fake",
         "host time of one guarded step's Governor calls, deferred, 292 tensors, CPU on the fake device "
         "(kernels excluded): <= 30 µs",
         "host-seconds", "guard-host/transformer-292-tensors", ("guarded-deferred",), 30e-6, "", "cpu"),
    Goal("guard-host-5000-fake",
         "host time of one guarded step's Governor calls, deferred, 5,000 tensors, CPU on the fake device "
         "(kernels excluded): <= 300 µs",
         "host-seconds", "guard-host/many-small-5000-tensors", ("guarded-deferred",), 300e-6, "", "cpu"),
    Goal("guard-overhead-300-cpu", "GuardedStep overhead, 292 tensors, CPU, both modes: <= +10 %",
         "overhead", "training-step/transformer-292-tensors", ("guarded-blocking", "guarded-deferred"), 0.10,
         "unguarded", "cpu"),
    Goal("guard-overhead-4-cpu", "GuardedStep overhead, 4 tensors, CPU, both modes: <= +50 %",
         "overhead", "training-step/mlp-4-tensors", ("guarded-blocking", "guarded-deferred"), 0.50,
         "unguarded", "cpu"),
)  # fmt: skip


def _percent(fraction: float, digits: int = 1, signed: bool = False) -> str:
    text = f"{fraction * 100:+.{digits}f} %" if signed else f"{fraction * 100:.{digits}f} %"
    return text.replace("-", "\u2212")


def _device_type(payload: Mapping[str, Any]) -> str:
    """``device_type`` of the run; older bench.json files only name the device."""
    kind = payload.get("device_type")
    if isinstance(kind, str):
        return kind
    return "cpu" if str(payload.get("device", "")).lower().startswith("cpu") else "cuda"


def _rows(payload: Mapping[str, Any]) -> dict[tuple[str, str], _Row]:
    rows = {}
    for row in payload.get("rows", ()):
        try:
            paired = row.get("paired")
            pair = (float(paired[0]), float(paired[1]), float(paired[2])) if paired is not None else None
            timed = _Row(float(row["median_s"]), float(row["p10_s"]), float(row["p90_s"]), pair)
        except (KeyError, TypeError, ValueError, IndexError):
            continue
        if all(math.isfinite(v) and v > 0 for v in (timed.median_s, timed.p10_s, timed.p90_s)):
            rows[(str(row["scenario"]), str(row["variant"]))] = timed
    return rows


def _straddles(low: float, high: float, target: float) -> str:
    return "the target lies inside this run's p10–p90 spread" if low <= target <= high else ""


def judge(goal: Goal, payload: Mapping[str, Any]) -> Verdict:
    """The verdict of one goal on one run (``payload``: a parsed bench.json)."""
    device_type = _device_type(payload)
    if goal.device_type is not None and goal.device_type != device_type:
        return Verdict(goal, NOT_MEASURED, note=f"a {goal.device_type} goal; this run was on {device_type}")
    rows = _rows(payload)
    wanted = [*goal.candidates, *([goal.baseline] if goal.baseline else [])]
    missing = [v for v in wanted if (goal.scenario, v) not in rows]
    if missing:
        return Verdict(goal, NOT_MEASURED, note=f"no {goal.scenario} {', '.join(missing)} row in this run")
    base = rows.get((goal.scenario, goal.baseline))
    measured, met, notes = [], True, ""
    for variant in goal.candidates:
        row = rows[(goal.scenario, variant)]
        if goal.kind == "speed" and base is not None:
            value, low, high = base.median_s / row.median_s, base.p10_s / row.p90_s, base.p90_s / row.p10_s
            ok, text = value >= goal.target, f"{value:.2f}×"
        elif goal.kind == "share" and base is not None:
            value, low, high = row.median_s / base.median_s, row.p10_s / base.p90_s, row.p90_s / base.p10_s
            ok, text = value <= goal.target, _percent(value, 2)
        elif goal.kind == "overhead" and base is not None:
            if row.paired is not None:  # rounds paired with the baseline's (older runs: medians)
                value, low, high = row.paired
            else:
                value = row.median_s / base.median_s - 1
                low, high = row.p10_s / base.p90_s - 1, row.p90_s / base.p10_s - 1
            ok, text = value <= goal.target, f"{variant} {_percent(value, signed=True)}"
            if value < 0:  # a guarded step cannot be cheaper than the unguarded one
                text += f" (below {goal.baseline}: noise or drift, not a speed-up)"
        elif goal.kind == "host-seconds":
            value, low, high = row.median_s, row.p10_s, row.p90_s
            ok, text = value <= goal.target, f"{value * 1e6:.1f} µs"
            floor = rows.get((goal.scenario, "floor"))
            if floor is not None:  # what reading each tensor's .grad and address once costs there
                text += f" ({value / floor.median_s:.1f}× the run's floor of {floor.median_s * 1e6:.1f} µs)"
        else:
            raise ValueError(f"goal {goal.name}: unknown kind {goal.kind!r} (or no baseline)")
        met = met and ok
        measured.append(text)
        notes = notes or _straddles(low, high, goal.target)
    return Verdict(goal, MET if met else NOT_MET, ", ".join(measured) + " at the median", notes)


def verdicts(payload: Mapping[str, Any], goals: Sequence[Goal] = GOALS) -> list[Verdict]:
    """Every goal judged on ``payload`` (a parsed bench.json), in the order of ``goals``."""
    return [judge(goal, payload) for goal in goals]


def verdict_lines(payload: Mapping[str, Any]) -> list[str]:
    return [verdict.line() for verdict in verdicts(payload)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tolaria.bench.goals", description=__doc__.splitlines()[0]
    )
    parser.add_argument("bench_json", type=Path, help="a bench.json written by tolaria bench")
    args = parser.parse_args(argv)
    try:
        payload = json.loads(args.bench_json.read_text())
    except (OSError, ValueError) as error:
        parser.error(f"{args.bench_json}: {error}")
    for line in verdict_lines(payload):
        print(f"- {line}")
    return 0


__all__ = ["GOALS", "MET", "NOT_MEASURED", "NOT_MET", "Goal", "Verdict", "judge", "verdict_lines", "verdicts"]

if __name__ == "__main__":
    raise SystemExit(main())
