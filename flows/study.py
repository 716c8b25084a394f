"""The FSQ paper's codebook-size study (its Figure 3) on our data: FSQ, VQ and Regularized VQ.

A sweep over codebook sizes (default 2^8, 2^10, 2^12, 2^14) for each quantizer: FSQ takes the
paper's Table-1 levels for each size, VQ and Regularized VQ the same number of codes. A profile
(params overrides shared by every point) sets the training budget. The result is one table
(``reports/study/codebook_size.csv`` and ``.md``) and one plot (``.png``) of codebook usage, PSNR
and sampling FID against codebook size.

    python -m flows.study --profile profiles/study-cpu.yaml
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from prefect import flow

from flows.pipeline import project_root
from flows.sweep import sweep, write_table
from imtok.overrides import merged
from imtok.params import read_yaml

QUANTIZERS = ("fsq", "vq", "regvq")
SIZES = (2**8, 2**10, 2**12, 2**14)
COLUMNS = {  # table column -> flattened metric key (flows.pipeline.read_metrics)
    "usage %": "tokenizer.codebook_usage_pct",
    "perplexity": "tokenizer.perplexity",
    "PSNR": "tokenizer.psnr",
    "SSIM": "tokenizer.ssim",
    "sampling {fid}": "generation.{fid}",
    "r{fid}": "tokenizer.r{fid}",
}


def points(
    sizes: tuple[int, ...] = SIZES,
    quantizers: tuple[str, ...] = QUANTIZERS,
    profile: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One sweep point per (quantizer, size): the profile plus the quantizer and its codebook."""
    if profile is not None and not isinstance(profile, dict):
        raise ValueError(f"study profile: expected {{section: {{key: value}}}}, got {profile!r:.200}")
    result = []
    for quantizer in quantizers:
        for size in sizes:
            overrides = merged(
                profile or {},
                {"tokenizer": {"quantizer": quantizer, "codebook_size": size, "levels": None}},
            )
            result.append({"name": f"{quantizer}-{size}", "overrides": overrides})
    return result


def fid_name(rows: list[dict[str, Any]]) -> str:
    """``fid`` when InceptionV3 features were used, else the domain network's ``fid_<name>``."""
    keys = {key for row in rows for key in row}
    if "generation.fid" in keys:
        return "fid"
    found = sorted(key for key in keys if key.startswith("generation.fid_"))
    return found[0].split(".", 1)[1] if found else "fid"


def study_rows(sweep_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's rows reduced to the study's columns (missing metrics are None)."""
    fid = fid_name(sweep_rows)
    rows = []
    for row in sweep_rows:
        out = {
            "quantizer": row["params.tokenizer.quantizer"],
            "codebook size": int(row["params.tokenizer.codebook_size"]),
        }
        for column, key in COLUMNS.items():
            out[column.format(fid=fid)] = row.get(key.format(fid=fid))
        rows.append(out)
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
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Usage, PSNR and sampling FID against log2(codebook size), one line per quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid_column = next(column for column in rows[0] if column.startswith("sampling"))
    panels = ("usage %", "PSNR", fid_column)
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for axis, column in zip(axes, panels, strict=True):
        for quantizer in dict.fromkeys(row["quantizer"] for row in rows):
            mine = [r for r in rows if r["quantizer"] == quantizer and r[column] is not None]
            mine.sort(key=lambda r: r["codebook size"])
            axis.plot(
                [math.log2(r["codebook size"]) for r in mine],
                [r[column] for r in mine],
                marker="o",
                label=quantizer,
            )
        axis.set_xlabel("log2 codebook size")
        axis.set_title(column)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)


@flow(name="imtok-codebook-study", log_prints=True)
def codebook_study(
    profile: dict[str, Any] | None = None,
    sizes: list[int] | None = None,
    quantizers: list[str] | None = None,
    project: str | None = None,
    out: str = "reports/study/codebook_size",
    use_remote: bool = True,
) -> list[dict[str, Any]]:
    """The sweep, then the study's table (CSV, Markdown) and plot under ``out`` (project-relative)."""
    root = project_root(project)
    sweep_rows = sweep(
        points=points(tuple(sizes or SIZES), tuple(quantizers or QUANTIZERS), profile),
        project=str(root),
        table=f"{out}-sweep.csv",
        use_remote=use_remote,
    )
    rows = study_rows(sweep_rows)
    base = root / out
    write_table(rows, base.with_suffix(".csv"))
    base.with_suffix(".md").write_text(markdown(rows))
    plot(rows, base.with_suffix(".png"))
    print(markdown(rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=None, help="overrides shared by points")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS))
    parser.add_argument("--project", default=None)
    parser.add_argument("--out", default="reports/study/codebook_size")
    parser.add_argument("--no-remote", action="store_true")
    args = parser.parse_args()
    try:
        profile = read_yaml(args.profile, "study profile") if args.profile else None
    except (OSError, ValueError) as error:
        parser.error(str(error))
    codebook_study(
        profile=profile,
        sizes=args.sizes,
        quantizers=args.quantizers,
        project=args.project,
        out=args.out,
        use_remote=not args.no_remote,
    )


if __name__ == "__main__":
    main()
