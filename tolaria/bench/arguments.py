"""The bench's command-line options, owned by the bench and shared by its front doors.

``tolaria bench``, ``python -m tolaria.bench`` and the checkout's ``python -m bench.runner`` all
build their parser with :func:`add_bench_arguments`. Only the standard library is imported here
(building a parser must not load the scenarios), and nothing here imports the CLI back.

Running the bench writes nothing but ``--out`` (default ``./tolaria-bench-out``, in the current
folder, never inside the package or a checkout's ``bench/``) and, only when asked, ``--csv PATH``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

DEFAULT_OUT = Path("tolaria-bench-out")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options: ``--device``, ``--quick``, ``--out DIR``, ``--csv PATH`` (``--no-csv``
    is accepted and does nothing: rows are written only where ``--csv`` says)."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda when available)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and training windows")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
        help=f"folder for bench.json and overhead.png (default: ./{DEFAULT_OUT})",
    )  # fmt: skip
    csv = parser.add_mutually_exclusive_group()
    csv.add_argument(
        "--csv", type=Path, default=None, metavar="PATH",
        help="append one CSV row per measurement to PATH (default: no CSV)",
    )  # fmt: skip
    csv.add_argument(
        "--no-csv", action="store_true",
        help="no effect, kept for old scripts: without --csv no CSV is written",
    )  # fmt: skip


def output_folder_problem(path: Path) -> str | None:
    """Create ``path`` (with its parents) and check that a file can be written there; returns
    why it cannot hold the bench's outputs, or None when it can."""
    if path.exists() and not path.is_dir():
        return "it exists and is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the folder ({error.strerror or error})"
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        return f"the folder is not writable ({error.strerror or error})"
    return None


def csv_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot take the CSV rows (a folder; a parent that cannot be created or
    written), or None when it can. Creates the parent folders; never creates the file."""
    if path.is_dir():
        return "it is a folder, not a file"
    if path.exists():
        try:
            with path.open("a"):
                pass
        except OSError as error:
            return f"the file is not writable ({error.strerror or error})"
        return None
    problem = output_folder_problem(path.parent)
    return None if problem is None else f"its folder {path.parent}: {problem}"


__all__ = ["DEFAULT_OUT", "add_bench_arguments", "csv_file_problem", "output_folder_problem"]
