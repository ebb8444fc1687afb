"""``tolaria bench`` runs without the checkout's ``bench/`` folder and writes only where it is told.

A plain ``pip install tolaria`` has the package and nothing else: the subprocess here runs the
bench from an empty folder with every import of the checkout's top-level ``bench`` refused, on
tiny scenarios (the real scenario code, small models) so it stays fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class NoCheckoutBench(importlib.abc.MetaPathFinder):
        # After a plain install there is no top-level `bench`: refuse it, whatever sys.path says.
        def find_spec(self, name, path, target=None):
            if name == "bench" or name.startswith("bench."):
                raise ImportError(f"{name} is not installed (a plain install has no bench/ folder)")
            return None

    sys.meta_path.insert(0, NoCheckoutBench())
    try:
        import bench  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the checkout's bench package is still importable")

    from tolaria.bench import runner, snapshot, training, workloads

    def tiny_training(device, quick):
        setup = training.mlp_setup("mlp-4-tensors", features=8, hidden=8, classes=2, batch=4)
        return training.setup_rows(setup, device, quick, fewest=1, budget_s=0.0)

    def tiny_snapshot(device, quick):
        work = snapshot.workload("many-small", workloads.many_small_model(device, layers=4))
        return snapshot.workload_rows(work, device, quick)

    runner.GROUPS = (("training loop", tiny_training), ("snapshot and restore", tiny_snapshot))
    from tolaria.cli import main

    raise SystemExit(main(["bench", "--device", "cpu", "--quick", *sys.argv[1:]]))
    """
)


def _checkout_files() -> set[str]:
    """Files under the checkout's bench/ and at its top level (caches left out)."""
    found = {
        p.relative_to(REPO).as_posix() for p in (REPO / "bench").rglob("*") if "__pycache__" not in p.parts
    }
    return found | {p.name for p in REPO.iterdir()}


def _run(cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, *extra], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_the_bench_runs_from_elsewhere_without_the_checkout_and_leaves_it_alone(tmp_path: Path) -> None:
    results_csv = REPO / "bench" / "results" / "results.csv"
    before, csv_before = _checkout_files(), results_csv.read_bytes()
    done = _run(tmp_path, "--csv", "rows/bench.csv")
    assert done.returncode == 0, done.stderr
    # The default --out is in the current folder; the CSV goes where --csv says; nothing else.
    out = tmp_path / "tolaria-bench-out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows", "tolaria-bench-out"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "overhead.png"]
    data = json.loads((out / "bench.json").read_text())
    assert data["complete"] is True and data["errors"] == [] and data["git_sha"]
    variants = {(row["scenario"], row["variant"]) for row in data["rows"]}
    assert {("snapshot/many-small", "governor-snapshot"), ("restore/many-small", "governor-rollback"),
            ("training-step/mlp-4-tensors", "guarded-blocking"),
            ("training-step/mlp-4-tensors", "guarded-deferred")} <= variants  # fmt: skip
    # Every training row but the baseline's carries its overhead paired round by round with it.
    training = [row for row in data["rows"] if row["scenario"] == "training-step/mlp-4-tensors"]
    assert {row["variant"] for row in training if row["paired"] is None} == {"unguarded"}
    assert all(len(row["paired"]) == 3 for row in training if row["variant"] != "unguarded")
    lines = (tmp_path / "rows" / "bench.csv").read_text().splitlines()
    assert lines[0].startswith("timestamp,git_sha,tolaria,torch,device,scenario,variant")
    assert len(lines) == 1 + len(data["rows"])
    # The goals whose rows this run has are judged (met or not: a measurement, not asserted).
    assert "## Goals of #18" in done.stdout
    judged = [line for line in data["verdicts"] if "5,000 small tensors" in line or "4 tensors" in line]
    assert len(judged) == 2 and not any(line.startswith("[not measured]") for line in judged)
    # The checkout: no new file, and the committed CSV untouched.
    assert _checkout_files() == before
    assert results_csv.read_bytes() == csv_before
