"""``tolaria demo``: every fault kind is detected, rolled back and recovered from; outputs are
written; a missed fault fails the run; bad arguments are usage errors, not tracebacks."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

import tolaria.demo.runner as runner
from tolaria import telemetry
from tolaria.cli import main
from tolaria.demo import DemoConfig, DemoResult, FaultRecord, run_demo
from tolaria.demo.report import PLOT_FILE, demo_console, render_summary, write_plot
from tolaria.governor import TolariaGovernor
from tolaria.telemetry import TelemetryEvent, TelemetryEventType

# Short enough for the test suite, long enough for the lobotomy fault: the loss must first fall
# well below the random-guess loss, with ten samples of history.
ALL_FAULTS = "nan_weight@30,inf_grad@45,lr_blowup@60,lobotomy@80"
EXPECTED_REASONS = {
    "nan_weight": {"governor_nan", "governor_nonfinite_params"},
    "inf_grad": {"governor_nonfinite_grads"},
    "lr_blowup": {
        "governor_divergence",
        "governor_grad_explosion",
        "governor_nan",
        "governor_nonfinite_grads",
    },
    "lobotomy": {"governor_lobotomy"},
}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # rich wraps at 80 columns when not on a terminal; one line per message keeps asserts simple.
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="module")
def all_faults(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(DemoConfig(task="cifar10", device="cpu", steps=100, faults=ALL_FAULTS, out_dir=out))
    # Presentation follows the run, as in `tolaria demo`: the runner trains, the report plots.
    result.plot_path = write_plot(result, out / PLOT_FILE)
    return result


def test_a_recurring_storm_is_escaped_where_plain_rollbacks_loop(tmp_path: Path) -> None:
    config = DemoConfig(task="cifar10", device="cpu", steps=90, faults="lr_storm@50", out_dir=tmp_path)
    result = run_demo(config)
    (storm,) = result.faults
    assert storm.ok, storm.failure_message()
    assert storm.plain_rollbacks is not None and storm.rollbacks < storm.plain_rollbacks and storm.escaped
    assert len(storm.plain_rollback_steps) == storm.plain_rollbacks
    assert all(50 <= step < 50 + config.lr_storm_steps for step in storm.plain_rollback_steps)
    console = Console(record=True, width=200)
    render_summary(result, console)
    text = console.export_text()
    assert f"(plain: {storm.plain_rollbacks})" in text and "the recovery policy escaped" in text
    assert write_plot(result, tmp_path / "loss.png").stat().st_size > 0
    # The control run's telemetry stayed private: the real run's file has the real rollbacks only.
    lines = (tmp_path / "telemetry.jsonl").read_text().splitlines()
    assert sum('"governor_rollback"' in line for line in lines) == storm.rollbacks


@pytest.mark.parametrize("kind", sorted(EXPECTED_REASONS))
def test_each_fault_is_detected_rolled_back_and_recovered(all_faults: DemoResult, kind: str) -> None:
    (record,) = [r for r in all_faults.faults if r.kind == kind]
    assert record.detected, record.failure_message()
    assert record.reason in EXPECTED_REASONS[kind]
    # NaN weights, Inf gradients and a zeroed head are caught on the step they happen; a blown-up
    # learning rate needs its bad updates to show, then three anomalies in a row at most.
    assert record.detected_step is not None
    assert record.detected_step - record.injected_step <= (4 if kind == "lr_blowup" else 0)
    assert record.rollback_ms > 0
    assert record.recovered, record.failure_message()
    assert record.loss_after <= record.recovery_limit < all_faults.random_guess_loss


def test_run_summary(all_faults: DemoResult) -> None:
    assert all_faults.ok and all_faults.failure_messages() == []
    assert all_faults.injected == {30: "nan_weight", 45: "inf_grad", 60: "lr_blowup", 80: "lobotomy"}
    assert len(all_faults.outcomes) == 100
    assert sum(o.rolled_back for o in all_faults.outcomes) == 4
    assert all_faults.unattributed_rollbacks == []
    assert all_faults.seed_stage == "FOSSILIZED"
    assert [text.split()[-1] for _, text in all_faults.seed_events[1:]] == [
        "TRAINING",
        "BLENDING",
        "HOLDING",
        "FOSSILIZED",
    ]
    assert all_faults.snapshots_committed > 1 and all_faults.snapshots_rejected == 0
    assert 0 < all_faults.overhead_fraction < 1
    # Training went on after the last fault: the final losses are well below a uniform guess.
    tail = [o.loss for o in all_faults.outcomes[-5:]]
    assert all(math.isfinite(x) and x < 0.5 * all_faults.random_guess_loss for x in tail)


def test_telemetry_jsonl_holds_the_run_and_the_sink_is_detached(all_faults: DemoResult) -> None:
    path = all_faults.telemetry_path
    assert path is not None and path.name == "telemetry.jsonl"
    events = [TelemetryEvent.from_dict(json.loads(line)) for line in path.read_text().splitlines()]
    kinds = [e.event_type for e in events]
    assert kinds.count(TelemetryEventType.GOVERNOR_ROLLBACK) == 4
    assert kinds.count(TelemetryEventType.GOVERNOR_PANIC) == 4
    committed = [e for e in events if e.event_type is TelemetryEventType.GOVERNOR_SNAPSHOT]
    assert len(committed) == all_faults.snapshots_committed
    reasons = [e.data.reason for e in events if e.event_type is TelemetryEventType.GOVERNOR_ROLLBACK]
    assert reasons == [r.reason for r in all_faults.faults]
    assert not any(isinstance(s, telemetry.JsonlSink) for s in telemetry.get_hub().sinks)


def test_loss_plot_is_a_png(all_faults: DemoResult) -> None:
    path = all_faults.plot_path
    assert path is not None and path.name == "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


class BlindGovernor(TolariaGovernor):
    """Never panics: every fault goes unnoticed."""

    def check_vital_signs(self, loss: object) -> bool:
        return False

    def check_health(self) -> bool:
        return False


def test_a_missed_fault_fails_the_cli_and_names_the_fault(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runner, "TolariaGovernor", BlindGovernor)
    status = main(
        ["demo", "--device", "cpu", "--steps", "20", "--faults", "nan_weight@12", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert status != 0
    assert "FAILED" in out and "nan_weight@12" in out and "NOT detected" in out
    # The blind guard still snapshotted the NaN weights at step 19; the store refused them.
    assert "1 rejected" in out
    assert (tmp_path / "telemetry.jsonl").exists() and (tmp_path / "loss.png").exists()


def test_tinystories_recovers_and_the_cli_reports_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["demo", "--task", "tinystories", "--device", "cpu", "--steps", "12"]
        + ["--faults", "inf_grad@6", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "inf_grad" in out and "nonfinite_grads" in out and "recovered" in out
    assert "OK: all 1 faults" in out
    # The seed was still on trial at step 6, so the rollback pruned it.
    assert "Seed: PRUNED" in out and "pruned by the rollback" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "mnist"], "invalid choice: 'mnist'"),
        (["--faults", "bogus@3"], "unknown fault kind 'bogus'"),
        (["--steps", "100", "--faults", "nan_weight@150"], "outside the run"),
        (["--steps", "-5"], "expected a positive integer, got -5"),
        (["--steps", "ten"], "expected a positive integer"),
        (["--device", "tpu"], "not a valid device"),
        (["--device", "meta"], "runs on cpu or cuda"),
        (["--steps", "40"], "default fault schedule needs --steps >= 100"),
        (["--seed", "-1"], "non-negative integer"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: tolaria demo" in err and message in err
    assert "Traceback" not in err


def test_cuda_without_cuda_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_run_demo_only_trains_it_neither_prints_nor_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_demo(DemoConfig(task="tinystories", device="cpu", steps=3, faults="none", out_dir=tmp_path))
    assert len(result.outcomes) == 3 and result.plot_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["telemetry.jsonl"]
    assert capsys.readouterr().out == ""


#: Every column header of the fault table, whole.
HEADERS = (
    "fault", "injected at", "caught at", "reason", "rollback", "rollbacks", "loss before", "loss after",
    "result",
)  # fmt: skip


def _fault_row(out: str, kind: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if line.strip().startswith(kind)]
    return re.split(r"\s{2,}", line.strip())


def test_piped_output_is_never_cut_and_has_no_progress_bar(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # stdout is captured (not a terminal) and no COLUMNS says how wide: rich would assume 80.
    monkeypatch.delenv("COLUMNS")
    assert not sys.stdout.isatty()
    status = main(
        ["demo", "--task", "tinystories", "--device", "cpu", "--steps", "12"]
        + ["--faults", "inf_grad@6", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "…" not in out and "\x1b[" not in out  # nothing cut, no terminal control codes
    header = next(line for line in out.splitlines() if "injected at" in line)
    assert re.split(r"\s{2,}", header.strip()) == list(HEADERS)
    kind, injected, caught, reason, rollback, count, before, after, result = _fault_row(out, "inf_grad")
    assert (kind, injected, caught, reason, count, result) == (
        "inf_grad", "6", "6", "nonfinite_grads", "1", "recovered",
    )  # fmt: skip
    assert re.fullmatch(r"\d+\.\d\d ms", rollback)
    for number in (before, after):
        assert math.isfinite(float(number))
    # Each message is one line, whatever its length.
    assert any(
        line.startswith("Governor overhead:") and line.endswith("rollbacks excluded)")
        for line in out.splitlines()
    )
    # The live bar (its task title is the task's name) is not drawn off a terminal.
    assert not any(line.startswith("tinystories") for line in out.splitlines())
    assert "━" not in out


def test_the_plain_console_keeps_long_numbers_whole() -> None:
    result = DemoResult("cifar10", "cuda:0 (NVIDIA H100 80GB HBM3)", 100_000, 10, 2.302585)
    record = FaultRecord("nan_weight", 12_345, 0.000123456, 1.0, 12_345, "governor_nonfinite_params")
    record.rollback_ms, record.loss_after, record.recovered, record.rollbacks = 1234.56, 0.000234567, True, 2
    result.faults = [record]
    buffer = io.StringIO()
    render_summary(result, demo_console(buffer))
    out = buffer.getvalue()
    assert "…" not in out
    assert _fault_row(out, "nan_weight") == [
        "nan_weight", "12345", "12345", "nonfinite_params",
        "1234.56 ms", "2", "0.000123", "0.000235", "recovered",
    ]  # fmt: skip
    assert (
        "steps are 0-based; losses (nats) are means over 5 steps; reasons without their governor_ prefix"
        in out
    )


@pytest.mark.parametrize("where", ["a file", "under a file", "in /proc"])
def test_an_unusable_out_folder_is_a_usage_error_before_training(
    where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    out, reason = {
        "a file": (file, "it exists and is not a folder"),
        "under a file": (file / "demo", "cannot create the folder"),
        "in /proc": (Path("/proc/forbidden"), "cannot create the folder"),
    }[where]
    if where == "in /proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")

    def never(*args: object, **kwargs: object) -> DemoResult:
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "run_demo", never)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cpu", "--steps", "20", "--faults", "none", "--out", str(out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "usage: tolaria demo" in captured.err and f"--out {out}: {reason}" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""  # not even the header line: nothing started
    assert file.read_text() == "not a folder"


def test_an_unwritable_out_folder_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # root may write anywhere: make the folder unwritable where the check looks.
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runner.tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match=r"the folder is not writable \(Permission denied\)"):
        runner.prepare_out_dir(tmp_path / "out")
