"""How ``tolaria demo`` shows a run: a live rich progress bar, the summary table, the loss plot.

Presentation follows the run: :func:`tolaria.demo.runner.run_demo` trains and returns a
:class:`~tolaria.demo.results.DemoResult`, and the functions here show it; this module may use
the runner's types, the runner never imports this module.

On a terminal the output is rich's usual (colours, the terminal's width, a live bar). Anywhere
else (a pipe, a file, a CI log) :func:`demo_console` gives a plain console instead: no live bar,
no colour codes, and no wrapping or cutting to 80 columns, so every header and number of the
summary table is there in full.

The plot uses matplotlib's object API with the Agg canvas directly (no pyplot), so it needs no
display and does not change the process-wide backend of a program that imports tolaria.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from tolaria.guard import StepOutcome

if TYPE_CHECKING:
    from tolaria.demo.results import DemoResult
    from tolaria.demo.runner import StepCallback

PLOT_FILE = "loss.png"
#: The console width off a terminal: more than any line or table of the demo needs, so none is
#: cut or wrapped (rich would otherwise assume 80 columns).
PLAIN_WIDTH = 1000


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}g}"


def short_reason(reason: str | None) -> str:
    """``governor_nonfinite_grads`` → ``nonfinite_grads``: the prefix is the same on every row."""
    if not reason:
        return "-"
    return reason.removeprefix("governor_")


def demo_console(file: IO[str] | None = None) -> Console:
    """The console ``tolaria demo`` prints to (stdout by default): rich's usual one on a terminal;
    elsewhere a plain one, :data:`PLAIN_WIDTH` columns wide and soft-wrapped, so nothing is cut."""
    console = Console(file=file)
    if console.is_terminal:
        return console
    return Console(file=file, width=PLAIN_WIDTH, soft_wrap=True)


@contextmanager
def live_progress(console: Console, total: int, title: str) -> Iterator[StepCallback]:
    """A live progress bar (step, loss, grad norm, last event); yields the ``on_step`` callback
    for :func:`tolaria.demo.runner.run_demo`. On a narrow terminal the event text is cut, not the
    step counter. Off a terminal there is no bar (it would only leave its last frame in a log)
    and the callback does nothing visible."""
    fixed = Column(no_wrap=True)
    columns = (
        TextColumn("[bold]{task.description}", table_column=fixed),
        BarColumn(bar_width=24),
        MofNCompleteColumn(table_column=fixed),
        TimeElapsedColumn(table_column=fixed),
        TextColumn(
            "loss {task.fields[loss]:>8} |g| {task.fields[grad]:>7}  {task.fields[event]}",
            table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
        ),
    )
    off_terminal = not console.is_terminal
    with Progress(*columns, console=console, transient=False, expand=True, disable=off_terminal) as progress:
        task = progress.add_task(title, total=total, loss="-", grad="-", event="")

        def on_step(outcome: StepOutcome, last_event: str) -> None:
            progress.update(
                task,
                advance=1,
                loss=_num(outcome.loss),
                grad=_num(outcome.grad_norm, 2),
                event=last_event.replace("governor_", ""),
            )

        yield on_step


def fault_table(result: DemoResult) -> Table:
    """One row per injected fault: when, how it was caught, how long the rollback took, losses."""
    table = Table(
        title=f"tolaria demo: {result.task} on {result.device}, {result.steps} steps",
        box=box.SIMPLE_HEAD,
        caption=(
            f"steps are 0-based; losses (nats) are means over {result.recovery_window} steps; "
            "reasons without their governor_ prefix; (plain: N) = rollbacks of the same storm "
            "with plain rollbacks and no recovery policy"
        ),
    )
    table.add_column("fault", no_wrap=True)
    for header in ("injected at", "caught at"):
        table.add_column(header, justify="right")
    table.add_column("reason", no_wrap=True)
    for header in ("rollback", "rollbacks", "loss before", "loss after"):
        table.add_column(header, justify="right")
    table.add_column("result", no_wrap=True)
    for record in result.faults:
        if record.ok:
            status = "[green]recovered[/]"  # how many rollbacks it took has its own column
        elif record.detected:
            status = "[red]NOT recovered[/]"
        else:
            status = "[red]MISSED[/]"
        table.add_row(
            record.kind,
            str(record.injected_step),
            "-" if record.detected_step is None else str(record.detected_step),
            short_reason(record.reason),
            "-" if math.isnan(record.rollback_ms) else f"{record.rollback_ms:.2f} ms",
            str(record.rollbacks)
            + ("" if record.plain_rollbacks is None else f" (plain: {record.plain_rollbacks})"),
            _num(record.loss_before),
            _num(record.loss_after),
            status,
        )
    return table


def render_summary(result: DemoResult, console: Console) -> None:
    """Print the fault table and the run's totals: overhead, snapshots, seed, outputs."""
    if result.faults:
        console.print(fault_table(result))
    else:
        console.print(f"tolaria demo: {result.task} on {result.device}, {result.steps} steps, no faults")
    console.print(
        f"Governor overhead: {100 * result.overhead_fraction:.1f}% of step time "
        f"(checks {100 * result.check_fraction:.1f}%, snapshots {100 * result.snapshot_fraction:.1f}%; "
        "rollbacks excluded)"
    )
    console.print(
        f"Snapshots: {result.snapshots_committed} committed, {result.snapshots_rejected} rejected "
        f"(every {result.snapshot_every} healthy steps, {result.snapshot_backend or 'unknown'} backend)"
    )
    for record in result.faults:
        if record.escaped is not None:
            verdict = "escaped" if record.escaped else "did NOT do better than plain rollbacks"
            console.print(
                f"Recurring fault {record.kind}@{record.injected_step}: the recovery policy {verdict}, "
                f"{record.rollbacks} rollback(s); the same storm with plain rollbacks took "
                f"{record.plain_rollbacks}"
            )
    seed = "; ".join(f"step {step}: {text}" for step, text in result.seed_events[-1:])
    console.print(f"Seed: {result.seed_stage}" + (f" ({seed})" if seed else ""))
    if result.unattributed_rollbacks:
        console.print(f"Rollbacks without an injected fault at steps {result.unattributed_rollbacks}")
    outputs = [str(path) for path in (result.telemetry_path, result.plot_path) if path is not None]
    console.print(f"Wrote {', '.join(outputs)} in {result.wall_seconds:.1f} s")


def write_plot(result: DemoResult, path: Path) -> Path:
    """Save the loss curve (log scale) with fault and rollback markers as a PNG; returns ``path``.

    Losses that were not finite are drawn as crosses on the top edge.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [o.step for o in result.outcomes]
    losses = [o.loss for o in result.outcomes]
    finite = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v) and v > 0]
    figure = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_yscale("log")
    if finite:
        xs, ys = zip(*finite, strict=True)
        axes.plot(xs, ys, color="tab:blue", linewidth=0.9, label="training loss")
    axes.axhline(result.random_guess_loss, color="grey", linestyle=":", linewidth=1, label="random guess")
    top = max([v for _, v in finite] + [result.random_guess_loss]) * 2
    bad = [s for s, v in zip(steps, losses, strict=True) if not math.isfinite(v)]
    if bad:
        axes.scatter(bad, [top] * len(bad), marker="x", color="black", zorder=3, label="non-finite loss")
    injected = sorted(result.injected.items())
    for index, (step, _) in enumerate(injected):
        axes.axvline(
            step,
            color="tab:red",
            linestyle="--",
            linewidth=1.2,
            label="fault injected" if index == 0 else None,
        )
    if injected:
        # Fault names as ticks on a top axis: they never collide with the curve or the markers.
        names = axes.secondary_xaxis("top")
        names.set_xticks([step for step, _ in injected], labels=[kind for _, kind in injected])
        names.tick_params(colors="tab:red", labelsize=8)
    rollbacks = [o for o in result.outcomes if o.rolled_back]
    if rollbacks:
        marks = [min(o.loss, top) if math.isfinite(o.loss) else top for o in rollbacks]
        axes.scatter(
            [o.step for o in rollbacks],
            marks,
            marker="v",
            s=60,
            color="tab:green",
            zorder=4,
            label="rollback",
        )
    for record in result.faults:
        if record.hold_until is None:
            continue
        axes.axvspan(record.injected_step, record.hold_until, color="tab:orange", alpha=0.12,
                     label="learning-rate storm")  # fmt: skip
        if record.plain_rollback_steps:
            axes.scatter(record.plain_rollback_steps, [top / 1.6] * len(record.plain_rollback_steps),
                         marker="v", s=40, facecolors="none", edgecolors="tab:purple", zorder=4,
                         label=f"plain rollbacks in the storm ({record.plain_rollbacks})")  # fmt: skip
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats, log scale)")
    axes.set_title(f"tolaria demo: {result.task}, {len(rollbacks)} rollback(s)")
    axes.legend(loc="upper right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


__all__ = [
    "PLAIN_WIDTH",
    "PLOT_FILE",
    "demo_console",
    "fault_table",
    "live_progress",
    "render_summary",
    "short_reason",
    "write_plot",
]
