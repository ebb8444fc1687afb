"""The bench's plumbing: baselines, outputs, the legacy-Governor baseline and the CLI entry."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tolaria.bench import arguments, outputs, runner
from tolaria.bench.common import Measurement
from tolaria.bench.legacy_governor import LegacyGovernor


def _rows() -> list[Measurement]:
    return [
        Measurement("training-step/x", "unguarded", "cpu", 0.010, 0.009, 0.011, 3),
        Measurement("training-step/x", "legacy", "cpu", 0.020, 0.019, 0.021, 3),
        Measurement("training-step/x", "guarded-deferred", "cpu", 0.0112, 0.0111, 0.0113, 3),
        Measurement("snapshot/x", "pageable-clone", "cpu", 0.100, 0.09, 0.11, 5, bytes=1000),
        Measurement("snapshot/x", "native", "cpu", 0.010, 0.009, 0.011, 5, bytes=1000),
        Measurement("health/x", "isfinite-loop", "cpu", 0.050, 0.04, 0.06, 5, bytes=1000),
        Measurement("health/x", "tolaria", "cpu", 0.005, 0.004, 0.006, 5, bytes=1000),
    ]


def _append(rows: list[Measurement], path: Path, stamp: str, sha: str) -> None:
    outputs.append_csv(rows, path, stamp=stamp, sha=sha, baseline_of=runner.baseline_of)


def _args(out: Path, csv_path: Path | None = None) -> runner.argparse.Namespace:
    return runner.argparse.Namespace(device="cpu", quick=True, out=out, csv=csv_path, no_csv=False)


def test_each_scenario_family_has_its_old_way_as_baseline() -> None:
    assert runner.baseline_of("snapshot/gpt2-small") == "pageable-clone"
    assert runner.baseline_of("restore/gpt2-small") == "load-state-dict"
    assert runner.baseline_of("health/many-small") == "isfinite-loop"
    assert runner.baseline_of("rollback/x") == "legacy-load-state-dict"
    assert runner.baseline_of("training-step/x") == "unguarded"
    assert runner.baseline_of("guard-host/x") == ""  # absolute host times: no old way to divide by


def test_csv_appends_one_row_per_measurement_with_ratios(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    _append(_rows(), path, "t0", "abc")
    _append(_rows()[:2], path, "t1", "abc")
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
    csv_path = tmp_path / "elsewhere" / "results.csv"
    monkeypatch.setattr(runner, "run_all", lambda device, quick, advance, save: (_rows(), []))
    assert runner.run_command(_args(tmp_path / "out", csv_path)) == 0
    out = capsys.readouterr().out
    assert out.index("## Ratios") < out.index("## Goals of #18") < out.index("## Measurements")
    assert "training-step/x: GuardedStep (deferred) adds +12.0 % to the step" in out
    assert "training-step/x: the original Governor's approach adds +100.0 % to the step" in out
    assert "[not measured] governor.snapshot(), 5,000 small tensors, CPU" in out
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len(data["rows"]) == len(_rows()) and data["quick"] is True and data["device_type"] == "cpu"
    assert data["complete"] is True and data["errors"] == []
    assert len(data["verdicts"]) == len(runner.goals.GOALS)
    counted = {c["variant"] for c in data["accounting"]}
    assert {"clip_grad_norm_", "tolaria-check", "clip_grad_norm_ + tolaria-check"} <= counted
    assert (tmp_path / "out" / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with csv_path.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(_rows())


def test_without_csv_only_the_out_folder_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "run_all", lambda device, quick, advance, save: (_rows(), []))
    assert runner.run_command(_args(Path("out"))) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/bench.json", "out/overhead.png",
    ]  # fmt: skip
    assert "rows appended" not in capsys.readouterr().err


def test_without_matplotlib_the_bench_still_runs_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(runner, "run_all", lambda device, quick, advance, save: (_rows(), []))
    assert runner.run_command(_args(tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json"]
    assert (
        "no overhead.png: matplotlib is not installed (pip install 'tolaria[bench]')"
        in capsys.readouterr().err
    )


def test_csv_rows_are_appended_as_each_group_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv_path = tmp_path / "results.csv"
    seen: list[int] = []

    def first(device: str, quick: bool) -> list[Measurement]:
        return _rows()[:3]

    def second(device: str, quick: bool) -> list[Measurement]:
        with csv_path.open() as handle:  # the first group's rows are on disk already
            seen.append(len(list(csv.DictReader(handle))))
        return _rows()[3:]

    monkeypatch.setattr(runner, "GROUPS", (("one", first), ("two", second)))
    assert runner.run_command(_args(tmp_path / "out", csv_path)) == 0
    with csv_path.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(_rows())
    assert seen == [3]


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
    assert runner.run_command(_args(out)) == 1
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


def test_tolaria_bench_cli_is_wired(capsys: pytest.CaptureFixture[str]) -> None:
    from tolaria.cli import main as tolaria_main

    with pytest.raises(SystemExit) as exit_info:
        tolaria_main(["bench", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert all(option in shown for option in ("--quick", "--device", "--out", "--csv", "--no-csv"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            tolaria_main(["bench", "--device", "cuda"])
        assert exit_info.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


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
    _append(_rows()[:2], out / "results.csv", stamp, "abc")
    results = tmp_path / "results"
    _append(_rows()[:1], results / "results.csv", "earlier", "old")

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

    assert not hasattr(cli, "add_bench_arguments")
    args = cli.build_parser().parse_args(["bench", "--quick", "--csv", "r.csv", "--out", "x"])
    assert (args.device, args.quick, args.csv, args.out) == (None, True, Path("r.csv"), Path("x"))
    own = runner.argparse.ArgumentParser()
    arguments.add_bench_arguments(own)
    assert vars(own.parse_args([])) == {
        "device": None,
        "quick": False,
        "out": Path("tolaria-bench-out"),
        "csv": None,
        "no_csv": False,
    }
    assert own.parse_args(["--no-csv"]).csv is None  # kept for old scripts; it changes nothing


def test_csv_and_no_csv_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from tolaria.cli import main as tolaria_main

    with pytest.raises(SystemExit) as exit_info:
        tolaria_main(["bench", "--csv", "r.csv", "--no-csv"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_options(capsys: pytest.CaptureFixture[str]) -> None:
    from tolaria.cli import main as tolaria_main

    with pytest.raises(SystemExit) as exit_info:
        tolaria_main(["doctor", "--quick"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --quick" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--out", "--csv"])
@pytest.mark.parametrize("where", ["a file", "under a file", "in /proc"])
@pytest.mark.parametrize("front_door", ["tolaria bench", "python -m tolaria.bench", "python -m bench.runner"])
def test_an_unusable_out_folder_or_csv_file_is_a_usage_error_before_measuring(
    option: str,
    where: str,
    front_door: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tolaria.cli import main as tolaria_main

    file = tmp_path / "bench.txt"
    file.write_text("not a folder")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    out, reason = {
        ("--out", "a file"): (file, "it exists and is not a folder"),
        ("--out", "under a file"): (file / "out", "cannot create the folder"),
        ("--out", "in /proc"): (Path("/proc/forbidden"), "cannot create the folder"),
        ("--csv", "a file"): (folder, "it is a folder, not a file"),  # the csv counterpart
        ("--csv", "under a file"): (file / "rows.csv", f"its folder {file}: it exists and is not a folder"),
        ("--csv", "in /proc"): (
            Path("/proc/forbidden/rows.csv"),
            "its folder /proc/forbidden: cannot create",
        ),
    }[(option, where)]
    if where == "in /proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")

    def never(args: object) -> int:
        raise AssertionError("the bench started")

    monkeypatch.setattr(runner, "run_command", never)
    argv = ["--device", "cpu", option, str(out)]
    if option == "--csv":
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        if front_door == "tolaria bench":
            tolaria_main(["bench", *argv])
        else:
            runner.main(argv, prog=front_door)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: {front_door}" in err and f"{option} {out}: {reason}" in err
    assert "Traceback" not in err
    assert file.read_text() == "not a folder"


def test_an_unwritable_out_folder_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:  # root may write anywhere
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(arguments.tempfile, "TemporaryFile", refuse)
    problem = arguments.output_folder_problem(tmp_path / "out")
    assert problem == "the folder is not writable (Permission denied)"


def test_the_readme_shows_the_bench_options_that_exist() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Benchmarks") :]
    section = section[: section.index("\n## ", 1)]
    usage = re.search(r"`tolaria bench ([^`]*)`", section)
    assert usage is not None, "the Benchmarks section shows the command"
    parser = runner.argparse.ArgumentParser()
    arguments.add_bench_arguments(parser)
    known = {option for action in parser._actions for option in action.option_strings} - {"-h", "--help"}
    assert set(re.findall(r"--[a-z-]+", usage.group(1))) | {"--no-csv"} == known
    assert "./tolaria-bench-out" in section and "--no-csv" in section
