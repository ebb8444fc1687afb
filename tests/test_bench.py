"""The bench's plumbing: baselines, outputs, the legacy-Governor baseline and the CLI entry."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import runner, training  # noqa: E402
from bench.common import Measurement  # noqa: E402
from bench.legacy_governor import LegacyGovernor  # noqa: E402


def _rows() -> list[Measurement]:
    return [
        Measurement("training-step/x", "unguarded", "cpu", 0.010, 0.009, 0.011, 3),
        Measurement("training-step/x", "legacy", "cpu", 0.020, 0.019, 0.021, 3),
        Measurement("training-step/x", "tolaria", "cpu", 0.0101, 0.0100, 0.0102, 3),
        Measurement("snapshot/x", "pageable-clone", "cpu", 0.100, 0.09, 0.11, 5, bytes=1000),
        Measurement("snapshot/x", "native", "cpu", 0.010, 0.009, 0.011, 5, bytes=1000),
        Measurement("health/x", "isfinite-loop", "cpu", 0.050, 0.04, 0.06, 5, bytes=1000),
        Measurement("health/x", "tolaria", "cpu", 0.005, 0.004, 0.006, 5, bytes=1000),
    ]


def test_each_scenario_family_has_its_old_way_as_baseline() -> None:
    assert runner.baseline_of("snapshot/gpt2-small") == "pageable-clone"
    assert runner.baseline_of("restore/gpt2-small") == "load-state-dict"
    assert runner.baseline_of("health/many-small") == "isfinite-loop"
    assert runner.baseline_of("rollback/x") == "legacy-load-state-dict"
    assert runner.baseline_of("training-step/x") == "unguarded"


def test_csv_appends_one_row_per_measurement_with_ratios(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    runner.append_csv(_rows(), path, stamp="t0", sha="abc")
    runner.append_csv(_rows()[:2], path, stamp="t1", sha="abc")
    with path.open() as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == len(_rows()) + 2  # one header only
    legacy = next(r for r in lines if r["variant"] == "legacy")
    assert float(legacy["ratio_to_baseline"]) == pytest.approx(2.0)
    assert {r["timestamp"] for r in lines} == {"t0", "t1"}
    assert all(r["torch"] == torch.__version__ and r["git_sha"] == "abc" for r in lines)


def test_run_command_writes_json_png_csv_and_prints_ratios_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = tmp_path / "results.csv"
    monkeypatch.setattr(runner, "RESULTS_CSV", csv_path)
    monkeypatch.setattr(runner, "run_all", lambda device, quick, advance, save: (_rows(), []))
    args = runner.argparse.Namespace(device="cpu", quick=True, out=tmp_path / "out", no_csv=False)
    assert runner.run_command(args) == 0
    out = capsys.readouterr().out
    assert out.index("## Ratios") < out.index("## Measurements")
    assert "tolaria adds +1.0% to the step time" in out
    assert "legacy adds +100.0% to the step time" in out
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len(data["rows"]) == len(_rows()) and data["quick"] is True
    assert data["complete"] is True and data["errors"] == []
    assert (tmp_path / "out" / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert csv_path.exists()


def test_a_failing_group_keeps_the_others_and_each_group_is_saved_as_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved: list[int] = []
    out = tmp_path / "out"

    def training_rows(device: str, quick: bool) -> list[Measurement]:
        return _rows()[:3]

    def broken(device: str, quick: bool) -> list[Measurement]:
        # The first group's rows are already on disk when the second one fails.
        saved.append(len(json.loads((out / "bench.json").read_text())["rows"]))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def health_rows(device: str, quick: bool) -> list[Measurement]:
        return _rows()[5:]

    groups = (("training loop", training_rows), ("snapshot and restore", broken), ("health", health_rows))
    monkeypatch.setattr(runner, "GROUPS", groups)
    args = runner.argparse.Namespace(device="cpu", quick=True, out=out, no_csv=True)
    assert runner.run_command(args) == 1
    assert saved == [3]
    data = json.loads((out / "bench.json").read_text())
    assert data["complete"] is True and len(data["rows"]) == 5
    assert data["errors"] == [
        "snapshot and restore: RuntimeError: CUDA error: an illegal memory access was encountered"
    ]


def test_legacy_governor_snapshots_checks_and_rolls_back() -> None:
    model = nn.Linear(4, 3)
    legacy = LegacyGovernor(model)
    legacy.snapshot()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert not legacy.parameters_finite()
    legacy.execute_rollback()
    assert legacy.parameters_finite()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    for _ in range(10):
        assert not legacy.check_vital_signs(1.0)
    assert legacy.check_vital_signs(float("nan"))
    assert [legacy.check_vital_signs(100.0) for _ in range(3)] == [False, False, True]


def test_training_scenario_measures_three_loops_on_one_model_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    config = training.TransformerConfig(vocab_size=64, context_length=8, d_model=16, n_layers=1, n_heads=2)
    monkeypatch.setattr(training, "setup_for", lambda d, q: training.TrainingSetup(config, 2, 8, "micro"))
    rows = training.training_rows("cpu", quick=True)
    assert [r.variant for r in rows] == ["unguarded", "legacy", "tolaria"]
    assert all(r.scenario == "training-step/micro" and r.median_s > 0 and r.reps == 3 for r in rows)
    lines = training.summary(rows)
    assert any(line.startswith("training-step/micro: tolaria adds") for line in lines)


def test_tolaria_bench_cli_is_wired() -> None:
    command = [sys.executable, "-m", "tolaria", "bench"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "--quick" in done.stdout and "--device" in done.stdout
    if not torch.cuda.is_available():
        bad = subprocess.run([sys.executable, "-m", "tolaria", "bench", "--device", "cuda"],
                             capture_output=True, text=True)  # fmt: skip
        assert bad.returncode == 2 and "CUDA is not available" in bad.stderr


def test_gpu_results_are_filed_under_a_dated_gpu_folder_once(tmp_path: Path) -> None:
    from bench import collect_gpu_results as collect

    out = tmp_path / "out"
    (out / "demo").mkdir(parents=True)
    (out / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB\n")
    stamp = "2026-11-27T10:00:00+00:00"
    (out / "bench.json").write_text(json.dumps({"timestamp": stamp, "quick": True, "rows": []}))
    (out / "summary.txt").write_text("build: rc=0 in 40s\n")
    (out / "demo" / "telemetry.jsonl").write_text("{}\n")
    (out / "huge.bin").write_bytes(b"x" * 2048)
    runner.append_csv(_rows()[:2], out / "results.csv", stamp=stamp, sha="abc")
    results = tmp_path / "results"
    runner.append_csv(_rows()[:1], results / "results.csv", stamp="earlier", sha="old")

    folder = collect.collect(out, results, max_bytes=1024)
    assert folder == results / "2026-11-27-h100-quick"
    assert (folder / "demo" / "telemetry.jsonl").exists() and not (folder / "huge.bin").exists()
    assert "build: rc=0 in 40s" in (folder / "README.md").read_text()
    with (results / "results.csv").open() as handle:
        assert [row["timestamp"] for row in csv.DictReader(handle)] == ["earlier", stamp, stamp]

    again = collect.collect(out, results, max_bytes=1024)  # a second collection: new folder, no rows
    assert again == results / "2026-11-27-h100-quick-2"
    with (results / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_gpu_slug_names_the_model() -> None:
    from bench.collect_gpu_results import gpu_slug

    assert gpu_slug("NVIDIA H200, 580.1, 143771 MiB") == "h200"
    assert gpu_slug("NVIDIA A100-SXM4-80GB, 550, 81920 MiB") == "a100"
    assert gpu_slug("Some Card") == "some-card"


def test_collecting_something_else_is_refused(tmp_path: Path) -> None:
    from bench import collect_gpu_results as collect

    with pytest.raises(SystemExit, match="not a folder"):
        collect.collect(tmp_path / "missing", tmp_path)
    with pytest.raises(SystemExit, match="not the output of bench/gpu_check.sh"):
        collect.collect(tmp_path, tmp_path)


def test_the_bench_owns_its_options_and_the_cli_takes_them_from_it() -> None:
    import tolaria.cli as cli
    from bench import arguments

    assert not hasattr(cli, "add_bench_arguments")
    args = cli.build_parser().parse_args(["bench", "--quick", "--no-csv", "--out", "x"])
    assert (args.device, args.quick, args.no_csv, args.out) == (None, True, True, Path("x"))
    own = runner.argparse.ArgumentParser()
    arguments.add_bench_arguments(own)
    assert vars(own.parse_args([])) == {
        "device": None,
        "quick": False,
        "out": Path("bench/out"),
        "no_csv": False,
    }


def test_without_a_checkout_bench_says_why_whatever_its_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tolaria.cli as cli

    monkeypatch.setattr(cli, "_bench_source_root", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--quick", "--out", "somewhere"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "runs from a source checkout" in err and "unrecognized" not in err
    with pytest.raises(SystemExit) as exit_info:  # other commands still refuse unknown options
        cli.main(["doctor", "--quick"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --quick" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a file", "under a file", "in /proc"])
@pytest.mark.parametrize("front_door", ["tolaria bench", "python -m bench.runner"])
def test_an_unusable_out_folder_is_a_usage_error_before_measuring(
    where: str,
    front_door: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tolaria.cli import main as tolaria_main

    file = tmp_path / "bench.txt"
    file.write_text("not a folder")
    out, reason = {
        "a file": (file, "it exists and is not a folder"),
        "under a file": (file / "out", "cannot create the folder"),
        "in /proc": (Path("/proc/forbidden"), "cannot create the folder"),
    }[where]
    if where == "in /proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")

    def never(args: object) -> int:
        raise AssertionError("the bench started")

    monkeypatch.setattr(runner, "run_command", never)
    argv = ["--device", "cpu", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        if front_door == "tolaria bench":
            tolaria_main(["bench", *argv])
        else:
            runner.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: {front_door}" in err and f"--out {out}: {reason}" in err
    assert "Traceback" not in err
    assert file.read_text() == "not a folder"


def test_an_unwritable_out_folder_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench import arguments

    def refuse(*args: object, **kwargs: object) -> None:  # root may write anywhere
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(arguments.tempfile, "TemporaryFile", refuse)
    problem = arguments.output_folder_problem(tmp_path / "out")
    assert problem == "the folder is not writable (Permission denied)"
