"""The ``tolaria`` command: ``tolaria demo | bench | doctor``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tolaria", description="Fail-safe watchdog for PyTorch training (detect, roll back, recover)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{doctor}")
    commands.add_parser("doctor", help="show what this installation can do and which backends it uses")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        from tolaria.doctor import run_doctor

        return run_doctor()
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown ones
