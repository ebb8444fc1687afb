"""The bench's command-line options, owned by the bench and shared by its two front doors.

``python -m bench.runner`` builds its parser with :func:`add_bench_arguments`, and so does
``tolaria bench`` (the CLI imports this module at parser build time, from a source checkout).
Only the standard library is imported here: building a parser must not load torch or the
benchmarks, and nothing here imports the CLI back.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

DEFAULT_OUT = Path("bench/out")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options: ``--device``, ``--quick``, ``--out DIR``, ``--no-csv``."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda when available)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions, smaller models (< 60 s on CPU)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
        help="folder for bench.json and overhead.png (default: bench/out)",
    )  # fmt: skip
    parser.add_argument(
        "--no-csv", action="store_true", help="do not append rows to bench/results/results.csv"
    )


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


__all__ = ["DEFAULT_OUT", "add_bench_arguments", "output_folder_problem"]
