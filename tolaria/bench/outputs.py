"""What a bench run leaves behind: CSV rows (only where ``--csv`` says) and the overhead plot.

``bench.json`` is written by the runner (:func:`tolaria.bench.runner.run_command`); the CSV keeps
the columns of the committed ``bench/results/results.csv`` so rows from any run can be appended
there by hand or by ``python -m bench.collect_gpu_results``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tolaria._version import __version__
from tolaria.bench.common import Measurement

CSV_FIELDS = ("timestamp", "git_sha", "tolaria", "torch", "device", "scenario", "variant",
              "median_s", "p10_s", "p90_s", "reps", "bytes", "ratio_to_baseline", "baseline")  # fmt: skip

BaselineOf = Callable[[str], str]


def ratios(rows: Sequence[Measurement], baseline_of: BaselineOf) -> dict[tuple[str, str], float]:
    """time(variant) / time(baseline) per row that has a baseline: below 1 is faster than the old way."""
    by_key = {(r.scenario, r.variant): r for r in rows}
    out = {}
    for row in rows:
        base = by_key.get((row.scenario, baseline_of(row.scenario)))
        if base is not None and base.median_s > 0:
            out[(row.scenario, row.variant)] = row.median_s / base.median_s
    return out


def append_csv(
    rows: Sequence[Measurement],
    path: Path,
    *,
    stamp: str,
    sha: str,
    baseline_of: BaselineOf,
    torch_version: str = torch.__version__,
) -> None:
    """Append one row per measurement to ``path``, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    by_row = ratios(rows, baseline_of)
    new = not path.exists() or path.stat().st_size == 0
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
                "ratio_to_baseline": f"{by_row.get((row.scenario, row.variant), math.nan):.4g}",
                "baseline": baseline_of(row.scenario),
            })  # fmt: skip


def plot_overheads(rows: Sequence[Measurement], path: Path, *, title: str, baseline_of: BaselineOf) -> bool:
    """Horizontal bars of time relative to the scenario's baseline, on a log scale. Returns False
    (and writes nothing) when matplotlib is not installed: the plot is the one optional output."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_row = ratios(rows, baseline_of)
    labels = [f"{s} · {v}" for (s, v) in by_row]
    values = list(by_row.values())
    fig, axis = plt.subplots(figsize=(10, 0.28 * len(values) + 1.5))
    ours = ("tolaria", "native", "governor", "guarded")
    colors = ["tab:green" if v.startswith(ours) else "tab:gray" for (_, v) in by_row]
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
    return True


__all__ = ["CSV_FIELDS", "append_csv", "plot_overheads", "ratios"]
