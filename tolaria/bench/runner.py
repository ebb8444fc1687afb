"""``tolaria bench``: every scenario in one process, next to the old way and the physical limit.

Scenario groups, in the order they run: the guarded training step (:mod:`tolaria.bench.training`),
on CUDA the host time of a guarded step's Governor calls (:mod:`tolaria.bench.host_cost`),
rollback end to end, snapshot and restore (:mod:`tolaria.bench.snapshot`) and health checks
(:mod:`tolaria.bench.health`). Each has end-to-end rows through the public API
(``governor.snapshot()``, ``governor.execute_rollback()``, ``GuardedStep`` blocking and deferred)
beside the store-level ones.

Output: the ratios, the verdicts on the goals of #18 (:mod:`tolaria.bench.goals`), the bytes a
step reads (computed), then a markdown table of absolute times with the device named, on
stdout; ``bench.json`` (rewritten after every group, so a run stopped by a time limit keeps what
it measured) and ``overhead.png`` under ``--out``; CSV rows only with ``--csv PATH`` (appended
as each group ends). Nothing else is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tolaria._version import __version__
from tolaria.bench import goals
from tolaria.bench import health as health_bench
from tolaria.bench import host_cost as host_cost_bench
from tolaria.bench import snapshot as snapshot_bench
from tolaria.bench import training as training_bench
from tolaria.bench.arguments import add_bench_arguments, csv_file_problem, output_folder_problem
from tolaria.bench.common import ByteCount, Measurement, all_finished, device_label, print_report
from tolaria.bench.outputs import append_csv, plot_overheads

#: Where the summary's byte counts come from: (device, quick) -> counts (computed, not timed).
ACCOUNTING: Callable[[str, bool], list[ByteCount]] = training_bench.accounting


def baseline_of(scenario: str) -> str:
    """The variant a scenario's ratios are taken against (the old way); "" when it has none."""
    if scenario.startswith(("snapshot/", "restore/")):
        return snapshot_bench.baseline_of(scenario)
    if scenario.startswith("health/"):
        return health_bench.BASELINE
    if scenario.startswith("rollback/"):
        return training_bench.ROLLBACK_BASELINE
    if scenario.startswith("training-step/"):
        return training_bench.TRAINING_BASELINE
    return ""


def git_sha() -> str:
    """The checkout's short commit when tolaria runs from one (an editable install), else
    "unknown": an installed package must not report the commit of whatever repository it sits in."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return "unknown"
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def summary_lines(rows: Sequence[Measurement], counts: Sequence[ByteCount] = ()) -> list[str]:
    rows = list(rows)
    return [*training_bench.summary(rows, list(counts)), *snapshot_bench.summary(rows),
            *health_bench.summary(rows), *host_cost_bench.summary(rows)]  # fmt: skip


#: The scenario groups, in the order they run: (name, rows for (device, quick)).
GROUPS: tuple[tuple[str, Callable[[str, bool], list[Measurement]]], ...] = (
    ("training loop", training_bench.training_rows),
    ("guarded-step host cost", host_cost_bench.run),  # CUDA only; early, as a lease may end
    ("rollback", training_bench.rollback_rows),
    ("snapshot and restore", snapshot_bench.run),
    ("health", health_bench.run),
)


def run_all(
    device: str,
    quick: bool,
    advance: Callable[[str], None],
    save: Callable[[list[Measurement], list[str]], None] | None = None,
) -> tuple[list[Measurement], list[str]]:
    """Run every scenario group; returns the rows and one line per group that raised.

    A group that raises does not stop the others (a GPU lease is too short to lose a whole run
    to one scenario); ``advance(name)`` and then ``save(rows, errors)`` follow each group, so a
    run killed by a time limit leaves what it had measured.
    """
    rows: list[Measurement] = []
    errors: list[str] = []
    for name, run in GROUPS:
        try:
            rows += run(device, quick)
        except Exception as error:  # noqa: BLE001 (reported in the output and the exit status)
            errors.append(f"{name}: {type(error).__name__}: {error}")
        advance(name)
        if save is not None:
            save(rows, errors)
    return rows, errors


def _backends(device: str) -> dict[str, str]:
    from tolaria.backends import health_backend_for, snapshot_backend_for

    where = torch.device(device)
    return {"snapshot": snapshot_backend_for(where).backend, "health": health_backend_for(where).backend}


def _load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m tolaria.bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").splitlines()[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    # Before anything is measured: a bad --out or --csv must not cost a whole run.
    if (problem := output_folder_problem(args.out)) is not None:
        parser.error(f"--out {args.out}: {problem}")
    if args.csv is not None and (problem := csv_file_problem(args.csv)) is not None:
        parser.error(f"--csv {args.csv}: {problem}")
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run the bench with parsed options (``device``, ``quick``, ``out``, ``csv``); the exit
    status: 0, or 1 when a group failed, nothing was measured or a measurement did not finish."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    console = Console(stderr=True)
    # A benchmark rolls back on purpose; its telemetry would drown the table.
    logging.getLogger("tolaria").setLevel(logging.ERROR)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    label, sha = device_label(device), git_sha()
    csv_path: Path | None = getattr(args, "csv", None)
    args.out.mkdir(parents=True, exist_ok=True)
    errors_before: list[str] = []
    try:
        counts = ACCOUNTING(device, args.quick)
    except Exception as error:  # noqa: BLE001 (reported like a failed group)
        counts, errors_before = [], [f"byte accounting: {type(error).__name__}: {error}"]
    written = 0
    # Other work on the machine is the first suspect for a noisy run: keep its load with the rows.
    load_at_start = _load_average()

    def payload(rows: list[Measurement], errors: list[str], *, complete: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "device": label, "device_type": torch.device(device).type, "torch": torch.__version__,
            "tolaria": __version__, "git_sha": sha, "timestamp": stamp, "quick": args.quick,
            "complete": complete, "errors": [*errors_before, *errors], "backends": _backends(device),
            "load_average_1m": {"start": load_at_start, "end": _load_average()},
            "summary": summary_lines(rows, counts), "accounting": [c.as_dict() for c in counts],
            "rows": [{**r.as_dict(), "baseline": baseline_of(r.scenario)} for r in rows],
        }  # fmt: skip
        data["verdicts"] = goals.verdict_lines(data)
        return data

    def save(rows: list[Measurement], errors: list[str], *, complete: bool = False) -> None:
        nonlocal written
        data = payload(rows, errors, complete=complete)
        (args.out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
        if csv_path is not None and written < len(rows):
            append_csv(rows[written:], csv_path, stamp=stamp, sha=sha, baseline_of=baseline_of)
            written = len(rows)

    # Off a terminal (a log, a pipe) the bar would only leave a blank line behind.
    with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:  # fmt: skip
        task = progress.add_task(GROUPS[0][0], total=len(GROUPS))

        def advance(done: str) -> None:
            progress.update(task, advance=1, description=f"{done} done")

        rows, errors = run_all(device, args.quick, advance, save)
    save(rows, errors, complete=True)
    errors = [*errors_before, *errors]
    wrote = [str(args.out / "bench.json")]
    if rows:
        data = payload(rows, errors, complete=True)
        print_report(f"tolaria bench on {label} (torch {torch.__version__}, tolaria {__version__}, {sha})",
                     rows, data["summary"], baseline_of, [("Goals of #18", data["verdicts"])])  # fmt: skip
        plot = args.out / "overhead.png"
        if plot_overheads(rows, plot, title=f"tolaria bench — {label}", baseline_of=baseline_of):
            wrote.append(str(plot))
        else:
            # markup=False: rich would read [bench] as a style tag and drop it.
            console.print("no overhead.png: matplotlib is not installed (pip install 'tolaria[bench]')",
                          markup=False)  # fmt: skip
    if csv_path is not None:
        wrote.append(f"{written} rows appended to {csv_path}")
    console.print("wrote " + ", ".join(wrote), markup=False)
    for failure in errors:
        console.print(f"[red]scenario group failed[/] {escape(failure)}")
    if not all_finished(rows):
        console.print("a measurement did not finish")
    return 1 if errors or not rows or not all_finished(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
