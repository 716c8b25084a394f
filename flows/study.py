"""The FSQ paper's codebook-size study (its Figure 3) on our data, with the baselines the papers use.

Rows per codebook size (default 2^8, 2^10, 2^12, 2^14), one label each (``LABELS``), the papers'
four first:

- ``fsq``: FSQ with the paper's Table-1 levels for the size;
- ``vq-plain``: the VQ the FSQ and RegVQ papers compare against: an EMA codebook from random
  initialisation, no k-means seeding, no dead-code restarts;
- ``vq``: our VQ, the same EMA codebook seeded by k-means on the first batch, with dead-code restarts;
- ``regvq``: Regularized VQ (prior KL, stochastic Gumbel mask; its contrastive loss needs VGG-19);
- ``lfq``, ``bsq``: lookup-free and binary spherical quantization, log2(size) channels, their entropy
  loss at the defaults;
- ``simvq``: SimVQ, a frozen random codebook through one learned linear layer;
- ``rfsq``: residual FSQ, two stages of the FSQ paper's levels for the size: the size is each stage's
  vocabulary, and an image has twice as many tokens (stage 1 refines stage 0).

The study runs in two parts a user can run separately, over the same points (named
``<label>-<size>``):

- ``tokenizer``: prepare, train_tokenizer, train_classifier, evaluate_tokenizer: usage, perplexity,
  PSNR, SSIM, rFID on the whole val split, and each point's validation curves;
- ``prior``: the whole pipeline, each point saved as a DVC experiment (``dvc exp apply <name>``); each
  tokenizer the first part trained resumes from its final checkpoint (no training: it is exported,
  registered and evaluated again), then tokens, prior, samples and their evaluation run: sampling
  FID, precision, recall.

After either part the report is rewritten from the sweep tables on disk: ``<out>.csv`` and ``.md``
(one row per point), ``<out>.png`` (usage, PSNR and sampling FID against codebook size, log axis) and
``<out>-convergence.png`` (val usage and PSNR against training step for every point). A profile
(params overrides shared by every point) sets the budget:

    python -m flows.study --profile profiles/study-cpu.yaml --part tokenizer
    python -m flows.study --profile profiles/study-cpu.yaml --part prior
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any

from prefect import flow

from flows.pipeline import project_root
from flows.sweep import sweep, write_table
from imtok import layout
from imtok.atomic import write_text_atomic
from imtok.overrides import merged
from imtok.params import read_yaml
from imtok.plots import pyplot, save_figure

# The VQ-VAE baseline of both papers: EMA codebook from its random initialisation, nothing re-seeded.
PLAIN_VQ_OPTIONS = {"kmeans_init": False, "restart_after_steps": None}
LABELS = {  # row label -> the tokenizer section that makes it (beside codebook_size)
    "fsq": {"quantizer": "fsq"},
    "vq-plain": {"quantizer": "vq", "quantizer_options": {"vq": PLAIN_VQ_OPTIONS}},
    "vq": {"quantizer": "vq"},
    "regvq": {"quantizer": "regvq"},
    "lfq": {"quantizer": "lfq"},
    "bsq": {"quantizer": "bsq"},
    "simvq": {"quantizer": "simvq"},
    "rfsq": {"quantizer": "rfsq", "quantizer_options": {"rfsq": {"stages": 2}}},
}
SIZES = (2**8, 2**10, 2**12, 2**14)
PARTS = {  # part -> the stages it reproduces (None: all)
    "tokenizer": ["check_params", "prepare", "train_tokenizer", "train_classifier", "evaluate_tokenizer"],
    "prior": None,
}
TOKENIZER_COLUMNS = {  # table column -> flattened metric key (flows.pipeline.read_metrics)
    "usage %": "tokenizer.codebook_usage_pct",
    "perplexity": "tokenizer.perplexity",
    "PSNR": "tokenizer.psnr",
    "SSIM": "tokenizer.ssim",
    "r{fid}": "tokenizer.r{fid}",
}
PRIOR_COLUMNS = {
    "sampling {fid}": "generation.{fid}",
    "precision": "generation.precision_{features}",
    "recall": "generation.recall_{features}",
}
CURVES_FILE = f"{layout.PLOTS}/tokenizer_curves.csv"  # written by evaluate_tokenizer, kept per point
CURVE_COLUMNS = {"usage %": "val_codebook_usage_pct", "PSNR": "val_psnr"}


def points(
    sizes: tuple[int, ...] = SIZES,
    labels: tuple[str, ...] = tuple(LABELS),
    profile: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One sweep point per (label, size): the profile plus the label's quantizer and the size."""
    if profile is not None and not isinstance(profile, dict):
        raise ValueError(f"study profile: expected {{section: {{key: value}}}}, got {profile!r:.200}")
    unknown = [label for label in labels if label not in LABELS]
    if unknown:
        raise ValueError(f"study: unknown label(s) {unknown}; choose from {list(LABELS)}")
    result = []
    for label in labels:
        for size in sizes:
            tokenizer = {**LABELS[label], "codebook_size": size, "levels": None}
            overrides = merged(profile or {}, {"tokenizer": tokenizer})
            result.append({"name": f"{label}-{size}", "overrides": overrides})
    return result


def label_and_size(name: str) -> tuple[str, int]:
    """``vq-plain-1024`` -> ``("vq-plain", 1024)``."""
    label, _, size = name.rpartition("-")
    return label, int(size)


def number(value: Any) -> Any:
    """A CSV cell as a float where it is one; empty cells are None, text stays text."""
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def read_sweep(path: Path) -> list[dict[str, Any]]:
    """A sweep table written by ``flows.sweep`` (none: no rows), numbers as floats."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{key: number(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def fid_name(rows: list[dict[str, Any]]) -> str:
    """``fid`` when InceptionV3 features were used, else the domain network's ``fid_<name>``."""
    keys = {key for row in rows for key, value in row.items() if value is not None}
    if "tokenizer.rfid" in keys or "generation.fid" in keys:
        return "fid"
    found = sorted(key for key in keys if key.startswith(("generation.fid_", "tokenizer.rfid_")))
    return found[0].split(".", 1)[1].removeprefix("r") if found else "fid"


def study_rows(
    tokenizer_rows: list[dict[str, Any]], prior_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per point of either sweep: the tokenizer columns from the tokenizer sweep (else from the
    prior sweep, which reproduces the same tokenizer), the sampling columns from the prior sweep;
    metrics a part has not produced are None. Sorted by label (``LABELS`` order), then size."""
    fid = fid_name(tokenizer_rows + prior_rows)
    features = fid.removeprefix("fid").removeprefix("_") or ""
    tokenizer_by_name = {row["name"]: row for row in tokenizer_rows}
    prior_by_name = {row["name"]: row for row in prior_rows}
    rows = []
    for name in dict.fromkeys([*tokenizer_by_name, *prior_by_name]):
        label, size = label_and_size(name)
        row: dict[str, Any] = {"quantizer": label, "codebook size": size}
        source = tokenizer_by_name.get(name) or prior_by_name[name]
        for column, key in TOKENIZER_COLUMNS.items():
            row[column.format(fid=fid)] = source.get(key.format(fid=fid))
        sampled = prior_by_name.get(name, {})
        for column, key in PRIOR_COLUMNS.items():
            metric = key.format(fid=fid, features=features).rstrip("_")
            row[column.format(fid=fid)] = sampled.get(metric)
        rows.append(row)
    order = list(LABELS)
    rows.sort(
        key=lambda r: (
            order.index(r["quantizer"]) if r["quantizer"] in order else len(order),
            r["codebook size"],
        )
    )
    return rows


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` of a kept ``tokenizer_curves.csv`` for ``CURVE_COLUMNS``."""
    curves: dict[str, list[tuple[int, float]]] = {column: [] for column in CURVE_COLUMNS}
    if not path.is_file():
        return curves
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for column, key in CURVE_COLUMNS.items():
                if row.get(key) not in (None, ""):
                    curves[column].append((int(row["step"]), float(row[key])))
    return curves


def last_change(points: list[tuple[int, float]]) -> float | None:
    """The change between the last two validations (None with fewer than two)."""
    return points[-1][1] - points[-2][1] if len(points) >= 2 else None


def with_convergence(rows: list[dict[str, Any]], curves_dir: Path) -> list[dict[str, Any]]:
    """Each row gains the change of val usage and PSNR between its last two validations."""
    for row in rows:
        curves = read_curves(curves_dir / f"{row['quantizer']}-{row['codebook size']}.csv")
        for column in CURVE_COLUMNS:
            row[f"Δ{column} last val"] = last_change(curves[column])
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: numbers to 3 significant digits, or whole when 100 or more."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            if isinstance(value, float):
                cells.append(f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}")
            else:
                cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Usage, PSNR and sampling FID against codebook size (log2 axis), one line per label."""
    plt = pyplot()

    fid_column = next(column for column in rows[0] if column.startswith("sampling"))
    panels = ("usage %", "PSNR", fid_column)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for axis, column in zip(axes, panels, strict=True):
        for label in dict.fromkeys(row["quantizer"] for row in rows):
            mine = sorted(
                (r for r in rows if r["quantizer"] == label and r[column] is not None),
                key=lambda r: r["codebook size"],
            )
            if mine:
                axis.plot(
                    [math.log2(r["codebook size"]) for r in mine],
                    [r[column] for r in mine],
                    marker="o",
                    label=label,
                )
        axis.set_xlabel("log2 codebook size")
        axis.set_title(column if any(r[column] is not None for r in rows) else f"{column} (not run)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    save_figure(figure, path)


def plot_convergence(rows: list[dict[str, Any]], curves_dir: Path, path: Path) -> None:
    """Val usage (top) and PSNR (bottom) against training step: a column per label, a line per size."""
    plt = pyplot()

    labels = list(dict.fromkeys(row["quantizer"] for row in rows))
    figure, axes = plt.subplots(2, len(labels), figsize=(3.6 * len(labels), 6.0), squeeze=False)
    for index, label in enumerate(labels):
        for row in (r for r in rows if r["quantizer"] == label):
            curves = read_curves(curves_dir / f"{label}-{row['codebook size']}.csv")
            for axis, column in zip(axes[:, index], CURVE_COLUMNS, strict=True):
                if curves[column]:
                    steps, values = zip(*curves[column], strict=True)
                    axis.plot(steps, values, marker=".", label=f"2^{int(math.log2(row['codebook size']))}")
        for axis, column in zip(axes[:, index], CURVE_COLUMNS, strict=True):
            axis.set_title(f"{label}: val {column}")
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        axes[0, index].legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def write_report(root: Path, out: str) -> list[dict[str, Any]]:
    """The study's table (CSV, Markdown), plot and convergence plot from every sweep table on disk
    (one per part, or one per part and group of labels when the labels ran as separate commands)."""
    base = root / out

    def tables(part: str) -> list[dict[str, Any]]:
        return [
            row
            for path in sorted(base.parent.glob(f"{base.name}-{part}-sweep*.csv"))
            for row in read_sweep(path)
        ]

    rows = study_rows(tables("tokenizer"), tables("prior"))
    if not rows:
        raise ValueError(f"study: no sweep table under {base.parent}; run a part first (--part tokenizer)")
    curves_dir = base.parent / "curves"
    rows = with_convergence(rows, curves_dir)
    write_table(rows, base.with_suffix(".csv"))
    write_text_atomic(base.with_suffix(".md"), markdown(rows))
    plot(rows, base.with_suffix(".png"))
    plot_convergence(rows, curves_dir, base.with_name(f"{base.name}-convergence.png"))
    return rows


def sweep_table(base: Path, part: str, labels: tuple[str, ...] = tuple(LABELS)) -> Path:
    """Where a part's sweep writes its rows: one table per group of labels, so that groups run as
    separate commands (e.g. one per core, in two clones) do not overwrite each other's rows."""
    group = "" if set(labels) == set(LABELS) else "-" + "-".join(labels)
    return base.with_name(f"{base.name}-{part}-sweep{group}.csv")


@flow(name="imtok-codebook-study", log_prints=True)
def codebook_study(
    profile: dict[str, Any] | None = None,
    sizes: list[int] | None = None,
    labels: list[str] | None = None,
    part: str = "tokenizer",
    project: str | None = None,
    out: str = f"{layout.REPORTS}/study/codebook_size",
    use_remote: bool = True,
) -> list[dict[str, Any]]:
    """One part of the study (``tokenizer`` or ``prior``), then the report under ``out``."""
    if part not in PARTS:
        raise ValueError(f"study: part {part!r} is not one of {list(PARTS)}")
    root = project_root(project)
    base = root / out
    chosen = tuple(labels or LABELS)
    sweep(
        points=points(tuple(sizes or SIZES), chosen, profile),
        project=str(root),
        stages=PARTS[part],
        table=str(sweep_table(base, part, chosen).relative_to(root)),
        use_remote=use_remote,
        keep={CURVES_FILE: str((base.parent / "curves").relative_to(root))} if part == "tokenizer" else None,
        experiments=PARTS[part] is None,  # DVC saves whole pipelines only
    )
    rows = write_report(root, out)
    print(markdown(rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=None, help="overrides shared by points")
    parser.add_argument(
        "--part", choices=[*PARTS, "report"], default="tokenizer", help="report: rewrite it only"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--labels", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--project", default=None)
    parser.add_argument("--out", default=f"{layout.REPORTS}/study/codebook_size")
    parser.add_argument("--no-remote", action="store_true")
    args = parser.parse_args()
    if args.part == "report":
        try:
            print(markdown(write_report(project_root(args.project), args.out)))
        except ValueError as error:
            parser.error(str(error))
        return
    try:
        profile = read_yaml(args.profile, "study profile") if args.profile else None
    except (OSError, ValueError) as error:
        parser.error(str(error))
    codebook_study(
        profile=profile,
        sizes=args.sizes,
        labels=args.labels,
        part=args.part,
        project=args.project,
        out=args.out,
        use_remote=not args.no_remote,
    )


if __name__ == "__main__":
    main()
