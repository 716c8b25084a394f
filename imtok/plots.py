"""PNG figures a user opens without internet: training curves, code usage, written atomically.

``dvc plots show`` renders the CSV plots with vega from a CDN; these PNGs are the same plots drawn
with matplotlib, declared as DVC image plots and logged to MLflow beside the run.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> None:
    """Write ``figure`` as a PNG at ``path`` atomically (a reader never sees half a file), close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)


def curves_png(table: Path, path: Path, title: str) -> None:
    """One panel per metric column of a ``step,...`` CSV (as ``write_curves`` writes it) against step;
    a table without rows gives one panel that says so."""
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = [name for name in (rows[0] if rows else {}) if name != "step"]
    series = {
        name: [(int(row["step"]), float(row[name])) for row in rows if row.get(name) not in (None, "")]
        for name in names
    }
    series = {name: points for name, points in series.items() if points}
    plt = pyplot()
    count = max(len(series), 1)
    figure, axes = plt.subplots(1, count, figsize=(3.4 * count, 3.0), squeeze=False)
    for axis, (name, points) in zip(axes[0], series.items(), strict=False):
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, marker="." if len(points) < 30 else None)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if not series:
        axes[0, 0].text(0.5, 0.5, "no metric history in MLflow", ha="center", va="center")
        axes[0, 0].set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)


def usage_png(counts: torch.Tensor, path: Path) -> None:
    """Codes sorted by how often val used them (share, log axis): a long flat tail is a healthy codebook."""
    ordered = torch.sort(counts.double(), descending=True).values
    total = max(float(ordered.sum()), 1.0)
    used = int((ordered > 0).sum())
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.0, 3.2))
    shares = (ordered[:used] / total).tolist()
    axis.plot(range(used), shares)
    axis.set_yscale("log")
    axis.set_xlabel("code rank")
    axis.set_ylabel("share of val tokens")
    axis.set_title(f"{used} of {len(ordered)} codes used on val ({100.0 * used / len(ordered):.1f}%)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)
