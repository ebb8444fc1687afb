"""The bench's verdicts on the goals of #18, and how its ratio lines read, on synthetic runs.

Verdicts are measurements: these tests feed made-up bench.json payloads and check the reading,
never a timing of this machine.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tolaria.bench import goals, wording
from tolaria.bench.common import Measurement


def _row(scenario: str, variant: str, median: float, spread: float = 0.01) -> dict[str, Any]:
    """A bench.json row whose p10/p90 sit ``spread`` (a fraction) either side of the median."""
    low, high = median * (1 - spread), median * (1 + spread)
    return {"scenario": scenario, "variant": variant, "device": "x", "median_s": median,
            "p10_s": low, "p90_s": high, "reps": 5, "bytes": 0}  # fmt: skip


def _payload(device_type: str | None, rows: list[dict[str, Any]], device: str = "cpu (x86_64, 2 threads)"
             ) -> dict[str, Any]:  # fmt: skip
    data: dict[str, Any] = {"device": device, "rows": rows}
    if device_type is not None:
        data["device_type"] = device_type
    return data


def _by_name(payload: dict[str, Any]) -> dict[str, goals.Verdict]:
    return {verdict.goal.name: verdict for verdict in goals.verdicts(payload)}


CPU_ROWS = [
    _row("snapshot/many-small", "pageable-clone", 0.100),
    _row("snapshot/many-small", "governor-snapshot", 0.010),  # 10×
    _row("snapshot/gpt2-small", "pageable-clone", 0.100),
    _row("snapshot/gpt2-small", "governor-snapshot", 0.150),  # 0.67×
    _row("training-step/transformer-292-tensors", "unguarded", 0.100),
    _row("training-step/transformer-292-tensors", "guarded-blocking", 0.105),
    _row("training-step/transformer-292-tensors", "guarded-deferred", 0.120),
]


def test_a_cpu_run_meets_misses_and_leaves_out_the_goals_it_did_not_measure() -> None:
    verdicts = _by_name(_payload("cpu", CPU_ROWS))
    assert [v.goal.name for v in goals.verdicts(_payload("cpu", CPU_ROWS))] == [g.name for g in goals.GOALS]
    assert verdicts["snapshot-many-small-cpu"].status == goals.MET
    assert verdicts["snapshot-many-small-cpu"].measured == "10.00× at the median"
    assert verdicts["snapshot-gpt2-small"].status == goals.NOT_MET
    # Both modes are judged; one over the target misses the goal, and both are named.
    overhead = verdicts["guard-overhead-300-cpu"]
    assert overhead.status == goals.NOT_MET
    assert overhead.measured == "guarded-blocking +5.0 %, guarded-deferred +20.0 % at the median"
    for name in ("snapshot-host-blocking-cuda", "guard-host-300-cuda", "guard-host-5000-cuda"):
        assert verdicts[name].status == goals.NOT_MEASURED
        assert verdicts[name].note == "a cuda goal; this run was on cpu"
    missing = verdicts["guard-overhead-4-cpu"]
    assert missing.status == goals.NOT_MEASURED and "no training-step/mlp-4-tensors" in missing.note


def test_a_cuda_run_judges_host_times_and_shares() -> None:
    rows = [
        _row("snapshot/gpt2-small", "pageable-clone", 0.200),
        _row("snapshot/gpt2-small", "governor-snapshot", 0.020),
        _row("snapshot/gpt2-small", "governor-snapshot-host", 0.001),  # 0.5 %
        _row("guard-host/transformer-292-tensors", "guarded-deferred", 25e-6),
        _row("guard-host/many-small-5000-tensors", "guarded-deferred", 400e-6),
    ]
    verdicts = _by_name(_payload("cuda", rows, device="NVIDIA H200"))
    assert verdicts["snapshot-host-blocking-cuda"].status == goals.MET
    assert verdicts["snapshot-host-blocking-cuda"].measured == "0.50 % at the median"
    assert verdicts["snapshot-gpt2-small"].status == goals.MET  # judged wherever the run was
    assert verdicts["guard-host-300-cuda"].status == goals.MET
    assert verdicts["guard-host-5000-cuda"].status == goals.NOT_MET
    assert verdicts["guard-host-5000-cuda"].measured == "400.0 µs at the median"
    assert verdicts["snapshot-many-small-cpu"].note == "a cpu goal; this run was on cuda"


def test_a_host_time_is_also_said_as_a_multiple_of_the_runs_floor() -> None:
    rows = [
        _row("guard-host/many-small-5000-tensors", "guarded-deferred", 400e-6),
        _row("guard-host/many-small-5000-tensors", "floor", 100e-6),
    ]
    verdict = _by_name(_payload("cuda", rows, device="NVIDIA H200"))["guard-host-5000-cuda"]
    assert verdict.status == goals.NOT_MET
    assert verdict.measured == "400.0 µs (4.0× the run's floor of 100.0 µs) at the median"


def test_a_target_inside_the_runs_spread_is_said_to_be_unsettled() -> None:
    rows = [_row("snapshot/many-small", "pageable-clone", 0.100, spread=0.2),
            _row("snapshot/many-small", "governor-snapshot", 0.0204, spread=0.2)]  # 4.9×  # fmt: skip
    verdict = _by_name(_payload("cpu", rows))["snapshot-many-small-cpu"]
    assert verdict.status == goals.NOT_MET
    assert verdict.note == "the target lies inside this run's p10–p90 spread"
    assert verdict.line() == (
        "[not met] governor.snapshot(), 5,000 small tensors, CPU: >= 5× the pageable clone — measured "
        "4.90× at the median — the target lies inside this run's p10–p90 spread"
    )


def test_a_negative_overhead_is_not_read_as_a_speed_up() -> None:
    rows = [_row("training-step/mlp-4-tensors", "unguarded", 0.010),
            _row("training-step/mlp-4-tensors", "guarded-blocking", 0.009),
            _row("training-step/mlp-4-tensors", "guarded-deferred", 0.011)]  # fmt: skip
    verdict = _by_name(_payload("cpu", rows))["guard-overhead-4-cpu"]
    assert verdict.status == goals.MET
    assert verdict.measured == (
        "guarded-blocking \u221210.0 % (below unguarded: noise or drift, not a speed-up), "
        "guarded-deferred +10.0 % at the median"
    )


def test_older_files_and_unfinished_rows() -> None:
    # bench.json from before device_type: the device's name says where it ran.
    rows = [_row("snapshot/gpt2-small", "governor-snapshot-host", 0.001),
            _row("snapshot/gpt2-small", "pageable-clone", 0.2)]  # fmt: skip
    old = _payload(None, rows, device="NVIDIA H100 80GB HBM3")
    assert _by_name(old)["snapshot-host-blocking-cuda"].status == goals.MET
    assert _by_name(_payload(None, CPU_ROWS))["snapshot-many-small-cpu"].status == goals.MET
    unfinished = [dict(CPU_ROWS[1], median_s=float("nan")), CPU_ROWS[0]]
    assert _by_name(_payload("cpu", unfinished))["snapshot-many-small-cpu"].status == goals.NOT_MEASURED
    assert all(v.status == goals.NOT_MEASURED for v in goals.verdicts({}))


def test_the_goals_command_reads_a_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_payload("cpu", CPU_ROWS)))
    assert goals.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(goals.GOALS) and lines[0].startswith("- [met] governor.snapshot()")
    with pytest.raises(SystemExit) as exit_info:
        goals.main([str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2


def _timed(variant: str, median: float, spread: float = 0.01) -> Measurement:
    return Measurement(
        "training-step/x", variant, "cpu", median, median * (1 - spread), median * (1 + spread), 5
    )


def test_an_overhead_line_never_reports_a_negative_cost() -> None:
    base = _timed("unguarded", 0.100)
    assert wording.overhead_line("s", base, _timed("guarded-deferred", 0.1012)) == (
        "s: GuardedStep (deferred) is inside this run's noise (+1.2 % at the median; its p10–p90 range "
        "overlaps the unguarded step's)"
    )
    assert wording.overhead_line("s", base, _timed("guarded-deferred", 0.1120)) == (
        "s: GuardedStep (deferred) adds +12.0 % to the step"
    )
    faster = wording.overhead_line("s", base, _timed("guarded-blocking", 0.0651))
    assert "adds" not in faster and "34.9 % faster than the unguarded step" in faster
    assert "not a speed-up" in faster
    noisy = wording.overhead_line("s", base, _timed("guarded-blocking", 0.0651, spread=0.6))
    assert "inside this run's noise (\u221234.9 % at the median" in noisy


def test_paired_rounds_are_what_an_overhead_line_and_a_goal_read() -> None:
    base = _timed("unguarded", 0.100, spread=0.3)  # a drifting run: the medians alone say little
    paired = replace(_timed("guarded-blocking", 0.130, spread=0.3), paired=(0.04, 0.02, 0.06))
    assert wording.overhead_line("s", base, paired) == (
        "s: GuardedStep (blocking) adds +4.0 % to the step (p10–p90 of 5 rounds paired with the unguarded "
        "step: +2.0 % to +6.0 %)"
    )
    noisy = replace(paired, paired=(0.01, -0.02, 0.03))
    assert "is inside this run's noise (+1.0 % at the median; p10–p90" in wording.overhead_line(
        "s", base, noisy
    )
    faster = replace(paired, paired=(-0.05, -0.08, -0.01))
    line = wording.overhead_line("s", base, faster)
    assert "adds" not in line and "5.0 % faster than the unguarded step" in line and line.endswith(": drift")
    # The goal reads the paired figure (+4 %, met), not the ratio of medians (+30 %, not met).
    rows = [_row("training-step/transformer-292-tensors", "unguarded", 0.100, spread=0.3)]
    for variant, pair in (("guarded-blocking", [0.04, 0.02, 0.06]), ("guarded-deferred", [0.08, 0.05, 0.12])):
        rows.append(
            {**_row("training-step/transformer-292-tensors", variant, 0.130, spread=0.3), "paired": pair}
        )
    verdict = _by_name(_payload("cpu", rows))["guard-overhead-300-cpu"]
    assert verdict.status == goals.MET
    assert verdict.measured == "guarded-blocking +4.0 %, guarded-deferred +8.0 % at the median"
    assert verdict.note == "the target lies inside this run's p10–p90 spread"  # deferred's p90 is +12 %


def test_speed_and_limit_lines() -> None:
    base, limit = _timed("pageable-clone", 0.100), _timed("limit", 0.009)
    assert wording.speed_line("s", base, _timed("governor-snapshot", 0.010), "the user's call") == (
        "s: governor.snapshot() is 10.0× faster than the pageable clone (the user's call)"
    )
    assert wording.speed_line("s", base, _timed("native", 0.150)) == (
        "s: the native store takes 1.50× the time of the pageable clone"
    )
    assert wording.speed_line("s", base, _timed("native", 0.0995)).endswith(
        "(inside this run's noise, the p10–p90 ranges overlap)"
    )
    assert wording.limit_line("s", limit, _timed("native", 0.010), "one copy") == (
        "s: the native store reaches 90 % of the limit (one copy)"
    )
    assert wording.limit_line("s", limit, _timed("native", 0.00909), "one copy") == (
        "s: the native store reaches 99 % of the limit (one copy) at the median; the p10–p90 ranges "
        "overlap, so this run cannot tell them apart"
    )
    above = wording.limit_line("s", limit, _timed("native", 0.0033), "one copy")
    assert "ran at 273 % of the limit's speed" in above and "no ceiling in this run" in above
    assert wording.percent(-0.349, signed=True) == "\u221234.9 %"
    assert [wording.share_percent(x) for x in (0.94, 0.012, 0.00035)] == ["94 %", "1.2 %", "0.035 %"]
