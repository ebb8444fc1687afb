"""The ``tolaria`` command: ``tolaria demo | bench | doctor``.

Each subcommand is an ``_add_<name>`` function that builds its subparser and registers a handler
with ``set_defaults(handler=...)``; a handler takes the parsed arguments and returns the exit
status. A handler raises :class:`UsageError` for bad arguments that argparse cannot check on its
own (they depend on each other or on the machine); ``main`` turns it into argparse's usual
``error:`` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A command-line argument is wrong; the message says which and what is accepted."""


def _int_at_least(minimum: int, kind: str) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum``; ``kind`` names them in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


# ------------------------------------------------------------------------------------- doctor
def _run_doctor(args: argparse.Namespace) -> int:
    from tolaria.doctor import run_doctor

    return run_doctor()


def _add_doctor(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor", help="show what this installation can do and which backends it uses"
    )
    doctor.set_defaults(handler=_run_doctor)


# --------------------------------------------------------------------------------------- demo
#: Fewest steps the ``default`` fault schedule works with: the lobotomy fault needs a trained
#: model (loss well below the random guess) and every fault needs room to recover.
MIN_STEPS_FOR_DEFAULT_FAULTS = 100


@contextmanager
def _quiet_event_log() -> Any:
    # The progress bar shows the latest event; the default logging sink would print each one again.
    events = logging.getLogger("tolaria.events")
    previous = events.level
    events.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        events.setLevel(previous)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from rich.markup import escape

    from tolaria.demo.faults import FaultSpecError
    from tolaria.demo.report import PLOT_FILE, demo_console, live_progress, render_summary, write_plot
    from tolaria.demo.runner import DemoConfig, prepare_out_dir, run_demo
    from tolaria.environment import parse_device, validate_device

    config = DemoConfig(
        task=args.task,
        device=args.device,
        steps=args.steps,
        faults=args.faults,
        out_dir=Path(args.out),
        seed=args.seed,
        snapshot_every=args.snapshot_every,
    )
    try:
        steps = config.resolved_steps()
        schedule = config.schedule()
        # The demo's own limit first (a meta or mps device is refused for that, whatever else
        # validate_device would say), then whether the device exists here.
        requested = parse_device(config.device)
        if requested.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {args.device!r}: the demo runs on cpu or cuda, not {requested.type}")
        device = validate_device(config.device)
    except (FaultSpecError, ValueError, RuntimeError) as error:
        raise UsageError(str(error)) from None
    if args.faults.strip().lower() == "default" and steps < MIN_STEPS_FOR_DEFAULT_FAULTS:
        raise UsageError(
            f"the default fault schedule needs --steps >= {MIN_STEPS_FOR_DEFAULT_FAULTS} (got {steps}); "
            "pass --faults none or an explicit SPEC such as 'nan_weight@20'"
        )
    # Last of the checks, as it creates the folder: a bad --out fails here, not after training.
    try:
        prepare_out_dir(config.out_dir)
    except ValueError as error:
        raise UsageError(f"--out {args.out}: {error}") from None
    # The plot is the one optional part: without matplotlib the demo still runs and says so.
    can_plot = importlib.util.find_spec("matplotlib") is not None

    console = demo_console()
    faults = ", ".join(str(fault) for fault in schedule) or "none"
    console.print(f"[bold]tolaria demo[/]: {config.task} on {device}, {steps} steps, faults: {faults}")
    with _quiet_event_log(), live_progress(console, steps, config.task) as on_step:
        result = run_demo(config, on_step=on_step)
    # Presentation, after the run: the plot, then the summary that names it.
    if can_plot:
        began = time.perf_counter()
        result.plot_path = write_plot(result, config.out_dir / PLOT_FILE)
        result.wall_seconds += time.perf_counter() - began
    render_summary(result, console)
    if not can_plot:
        console.print("No loss plot: matplotlib is not installed (pip install 'tolaria[demo]')", markup=False)
    failures = result.failure_messages()
    for message in failures:
        console.print(f"[bold red]FAILED[/]: {escape(message)}")
    if failures:
        return 1
    if schedule:
        console.print(
            f"[bold green]OK[/]: all {len(schedule)} faults were detected, rolled back and recovered from"
        )
    return 0


def _add_demo(commands: Any) -> None:
    from tolaria.demo.faults import FAULT_KINDS
    from tolaria.demo.runner import DEFAULT_STEPS
    from tolaria.tasks import available_tasks

    kinds = "\n".join(f"  {kind:<11} {text}" for kind, text in FAULT_KINDS.items())
    demo = commands.add_parser(
        "demo",
        help="train a small model, break it on schedule, and watch tolaria roll it back",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a morphogenetic model on synthetic data (no download) under the Governor, inject\n"
            "scheduled faults and show that each is detected, rolled back and recovered from.\n"
            "Exit status: 0 when every fault was, 1 when one was missed or not recovered from,\n"
            "2 for bad arguments."
        ),
        epilog=(
            "fault SPEC: 'default' (the four kinds at 20/40/60/80% of the run), 'none', or\n"
            "KIND@STEP[,KIND@STEP...] with 0 <= STEP < --steps, e.g.\n"
            "  nan_weight@60,inf_grad@120,lr_blowup@180,lobotomy@240\n"
            f"kinds:\n{kinds}"
        ),
    )
    demo.add_argument(
        "--task", choices=available_tasks(), default="cifar10", help="what to train (default: cifar10)"
    )
    demo.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto = cuda when available)"
    )
    steps_help = ", ".join(f"{task} {steps}" for task, steps in DEFAULT_STEPS.items())
    demo.add_argument(
        "--steps", type=_positive_int, default=None, help=f"training steps (default per task: {steps_help})"
    )
    demo.add_argument("--faults", default="default", metavar="SPEC", help="fault schedule (default: default)")
    demo.add_argument(
        "--out", default="tolaria-demo-out", metavar="DIR", help="output folder (default: ./tolaria-demo-out)"
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--snapshot-every",
        type=_positive_int,
        default=10,
        metavar="K",
        help="healthy steps between snapshots (default: 10)",
    )
    demo.set_defaults(handler=_run_demo, subparser=demo)


# -------------------------------------------------------------------------------------- bench
def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from tolaria.bench.arguments import csv_file_problem, output_folder_problem

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    # Before anything is measured: a bad --out or --csv must not cost a whole run.
    if (problem := output_folder_problem(args.out)) is not None:
        raise UsageError(f"--out {args.out}: {problem}")
    if args.csv is not None and (problem := csv_file_problem(args.csv)) is not None:
        raise UsageError(f"--csv {args.csv}: {problem}")
    from tolaria.bench.runner import run_command

    return run_command(args)


def _add_bench(commands: Any) -> None:
    # The bench owns its options (``python -m tolaria.bench`` takes the same); that module
    # imports only the standard library, and never this one.
    from tolaria.bench.arguments import add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="measure tolaria's overhead next to the old Governor's approach and the physical limit",
        description="Run every benchmark scenario in one process: the guarded training step (unguarded, "
        "the original Governor's approach, GuardedStep blocking and deferred), rollback, snapshot/restore "
        "and health checks, each through the public API and store by store; then judge the goals of #18. "
        "Writes --out (default ./tolaria-bench-out) and, only when given, --csv PATH.",
    )
    add_bench_arguments(bench)
    bench.set_defaults(handler=_run_bench, subparser=bench)


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tolaria", description="Fail-safe watchdog for PyTorch training (detect, roll back, recover)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_demo, _add_bench, _add_doctor):
        add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as error:
        # The subcommand's own parser, so the usage line printed is that subcommand's.
        getattr(args, "subparser", parser).error(str(error))
        raise AssertionError("unreachable: argparse's error() exits") from error
