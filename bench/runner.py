"""``tolaria bench``: every scenario in one process, next to the old way and the physical limit.

Scenarios: snapshot and restore (:mod:`bench.snapshot`), health of parameters-sized tensor
sets (:mod:`bench.health`), rollback end to end and the guarded training loop
(:mod:`bench.training`). Output: the ratios, then a markdown table with absolute times and the
device named, on stdout; ``bench.json`` and ``overhead.png`` under ``--out``; one CSV row per
measurement appended to ``bench/results/results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench import health as health_bench
from bench import snapshot as snapshot_bench
from bench import training as training_bench
from bench.arguments import add_bench_arguments, output_folder_problem
from bench.common import Measurement, all_finished, device_label, print_report
from tolaria._version import __version__

RESULTS_CSV = Path(__file__).resolve().parent / "results" / "results.csv"
CSV_FIELDS = ("timestamp", "git_sha", "tolaria", "torch", "device", "scenario", "variant",
              "median_s", "p10_s", "p90_s", "reps", "bytes", "ratio_to_baseline", "baseline")  # fmt: skip


def baseline_of(scenario: str) -> str:
    """The variant a scenario's ratios are taken against (the old way)."""
    if scenario.startswith(("snapshot/", "restore/")):
        return snapshot_bench.baseline_of(scenario)
    if scenario.startswith("health/"):
        return health_bench.BASELINE
    if scenario.startswith("rollback/"):
        return training_bench.ROLLBACK_BASELINE
    return training_bench.TRAINING_BASELINE


def _git_sha() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _ratios(rows: Sequence[Measurement]) -> dict[tuple[str, str], float]:
    """time(variant) / time(baseline) per row: below 1 is faster than the old way."""
    by_key = {(r.scenario, r.variant): r for r in rows}
    out = {}
    for row in rows:
        base = by_key.get((row.scenario, baseline_of(row.scenario)))
        if base is not None and base.median_s > 0:
            out[(row.scenario, row.variant)] = row.median_s / base.median_s
    return out


def append_csv(
    rows: Sequence[Measurement], path: Path, *, stamp: str, sha: str, torch_version: str = torch.__version__
) -> None:
    """Append one row per measurement, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ratios = _ratios(rows)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({
                "timestamp": stamp, "git_sha": sha, "tolaria": __version__, "torch": torch_version,
                "device": row.device, "scenario": row.scenario, "variant": row.variant,
                "median_s": f"{row.median_s:.9g}", "p10_s": f"{row.p10_s:.9g}", "p90_s": f"{row.p90_s:.9g}",
                "reps": row.reps, "bytes": row.bytes,
                "ratio_to_baseline": f"{ratios.get((row.scenario, row.variant), math.nan):.4g}",
                "baseline": baseline_of(row.scenario),
            })  # fmt: skip


def plot_overheads(rows: Sequence[Measurement], path: Path, *, title: str) -> None:
    """Horizontal bars of time relative to the scenario's baseline, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = _ratios(rows)
    labels = [f"{s} · {v}" for (s, v) in ratios]
    values = list(ratios.values())
    fig, axis = plt.subplots(figsize=(10, 0.28 * len(values) + 1.5))
    colors = ["tab:green" if v == "tolaria" or v.startswith("native") else "tab:gray" for (_, v) in ratios]
    axis.barh(range(len(values)), values, color=colors)
    axis.set_yticks(range(len(values)), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xlabel("time relative to the old way (log scale; < 1 is faster)")
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_lines(rows: Sequence[Measurement]) -> list[str]:
    return [*training_bench.summary(list(rows)), *snapshot_bench.summary(list(rows)),
            *health_bench.summary(list(rows))]  # fmt: skip


#: The scenario groups, in the order they run: (name, rows for (device, quick)).
GROUPS: tuple[tuple[str, Callable[[str, bool], list[Measurement]]], ...] = (
    ("training loop", training_bench.training_rows),
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runner", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    # Before anything is measured: a bad --out must not cost a whole run.
    if (problem := output_folder_problem(args.out)) is not None:
        parser.error(f"--out {args.out}: {problem}")
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    console = Console(stderr=True)
    # A benchmark rolls back on purpose; its telemetry would drown the table.
    logging.getLogger("tolaria").setLevel(logging.ERROR)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    label = device_label(device)
    sha = _git_sha()
    args.out.mkdir(parents=True, exist_ok=True)

    def write_json(rows: list[Measurement], errors: list[str], *, complete: bool) -> None:
        payload = {"device": label, "torch": torch.__version__, "tolaria": __version__, "git_sha": sha,
                   "timestamp": stamp, "quick": args.quick, "complete": complete, "errors": errors,
                   "summary": summary_lines(rows),
                   "rows": [{**r.as_dict(), "baseline": baseline_of(r.scenario)} for r in rows]}  # fmt: skip
        (args.out / "bench.json").write_text(json.dumps(payload, indent=2) + "\n")

    # Off a terminal (a log, a pipe) the bar would only leave a blank line behind.
    with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:  # fmt: skip
        task = progress.add_task(GROUPS[0][0], total=len(GROUPS))

        def advance(done: str) -> None:
            progress.update(task, advance=1, description=f"{done} done")

        rows, errors = run_all(device, args.quick, advance,
                               lambda rows, errors: write_json(rows, errors, complete=False))  # fmt: skip
    write_json(rows, errors, complete=True)
    if rows:
        print_report(f"tolaria bench on {label} (torch {torch.__version__}, tolaria {__version__}, {sha})",
                     rows, summary_lines(rows), baseline_of)  # fmt: skip
        plot_overheads(rows, args.out / "overhead.png", title=f"tolaria bench — {label}")
        if not args.no_csv:
            append_csv(rows, RESULTS_CSV, stamp=stamp, sha=sha)
        console.print(f"wrote {args.out / 'bench.json'}, {args.out / 'overhead.png'}"
                      + ("" if args.no_csv else f", appended {len(rows)} rows to {RESULTS_CSV}"))  # fmt: skip
    for error in errors:
        console.print(f"[red]scenario group failed[/] {error}")
    if not all_finished(rows):
        console.print("a measurement did not finish")
    return 1 if errors or not rows or not all_finished(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
