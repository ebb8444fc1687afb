"""File what ``bench/gpu_check.sh`` wrote on a GPU machine under ``bench/results/``.

``python -m bench.collect_gpu_results FOLDER`` (the ``$OUT`` of the GPU run, fetched to this
machine) copies its files into ``bench/results/<date>-<gpu>[-quick]/`` (date from
``bench.json``, the GPU from ``gpu.txt``; a numbered suffix if that folder exists), appends its
``results.csv`` rows to ``bench/results/results.csv`` unless rows with the same timestamp are
already there, and writes a ``README.md`` that starts from the run's ``summary.txt`` for a person
to complete. Files larger than ``--max-bytes`` are left out and named.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MAX_BYTES = 5 * 1024 * 1024


def gpu_slug(gpu_line: str) -> str:
    """A short folder name for the GPU of a ``nvidia-smi`` csv line: its model (h100, h200,
    a100, ...) when one is named, else the whole name made safe."""
    name = gpu_line.split(",")[0].strip()
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    text = model.group(1) if model else name
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def destination(source: Path, results: Path) -> Path:
    data = _bench_json(source)
    stamp = data.get("timestamp") if data else None
    day = stamp[:10] if isinstance(stamp, str) else dt.date.today().isoformat()
    gpu_file = source / "gpu.txt"
    slug = gpu_slug(gpu_file.read_text().splitlines()[0]) if gpu_file.exists() else "gpu"
    base = f"{day}-{slug}" + ("-quick" if data and data.get("quick") else "")
    folder, number = results / base, 2
    while folder.exists():
        folder, number = results / f"{base}-{number}", number + 1
    return folder


def _bench_json(source: Path) -> dict | None:
    path = source / "bench.json"
    return json.loads(path.read_text()) if path.exists() else None


def copy_files(source: Path, folder: Path, max_bytes: int) -> tuple[list[str], list[str]]:
    """Copy every regular file under ``source`` (keeping sub-folders); returns (copied, left out)."""
    copied, skipped = [], []
    for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(source)
        if path.stat().st_size > max_bytes:
            skipped.append(f"{relative} ({path.stat().st_size} bytes)")
            continue
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied.append(str(relative))
    return copied, skipped


def append_rows(run_csv: Path, results_csv: Path) -> int:
    """Append ``run_csv``'s rows to ``results_csv`` (same columns); 0 when its timestamps are
    already there (collected before) or it has no rows."""
    with run_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    if not rows or not fields:
        return 0
    if results_csv.exists():
        with results_csv.open(newline="") as handle:
            present = {row["timestamp"] for row in csv.DictReader(handle)}
        if {row["timestamp"] for row in rows} & present:
            return 0
    new = not results_csv.exists()
    with results_csv.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def collect(source: Path, results: Path = RESULTS, max_bytes: int = MAX_BYTES) -> Path:
    if not source.is_dir():
        raise SystemExit(f"{source}: not a folder (pass the $OUT of a bench/gpu_check.sh run)")
    if not (source / "gpu.txt").exists() and not (source / "bench.json").exists():
        raise SystemExit(f"{source}: no gpu.txt or bench.json: not the output of bench/gpu_check.sh")
    folder = destination(source, results)
    copied, skipped = copy_files(source, folder, max_bytes)
    appended = (
        append_rows(source / "results.csv", results / "results.csv")
        if (source / "results.csv").exists()
        else 0
    )
    summary = (
        (source / "summary.txt").read_text() if (source / "summary.txt").exists() else "(no summary.txt)\n"
    )
    readme = folder / "README.md"
    if not readme.exists():
        readme.write_text(
            f"# GPU run: {folder.name}\n\n`bench/gpu_check.sh` output, collected by "
            "`python -m bench.collect_gpu_results`. What it printed last:\n\n"
            f"```\n{summary}```\n\nWhat it showed, and what failed: (to be written)\n"
        )
    print(f"copied {len(copied)} files to {folder}")
    for line in skipped:
        print(f"left out (over {max_bytes} bytes): {line}")
    print(f"appended {appended} rows to {results / 'results.csv'}" if appended else "no CSV rows appended")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.collect_gpu_results", description=__doc__.splitlines()[0]
    )
    parser.add_argument("source", type=Path, help="the $OUT folder of a gpu_check.sh run")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="leave out larger files")
    args = parser.parse_args(argv)
    collect(args.source, max_bytes=args.max_bytes)


if __name__ == "__main__":
    main()
