"""Parameter sweeps: the pipeline once per point, each saved as a DVC experiment, one metrics table.

A point is ``{"name": ..., "overrides": {section: {key: value}}}``. Every point is validated before
the first one runs. Each point starts from the params.yaml the sweep found (restored after the
sweep too, with the dvc.lock and outputs it found, if it found a dvc.lock), so points never leak
into each other;
``dvc exp apply <name>`` brings one back. Unchanged stages (e.g. ``prepare`` for every point) are
skipped by DVC's cache.

    python -m flows.sweep points.yaml --table reports/sweep.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from pathlib import Path
from typing import Any

from prefect import flow

from flows.dag import read_stages, uncached_outputs
from flows.dvc import DvcCommandError, dvc
from flows.pipeline import pipeline, project_root
from imtok import layout
from imtok.atomic import write_bytes_atomic, write_text_atomic
from imtok.overrides import leaves, validated
from imtok.params import read_yaml

EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.))*")


def flat_overrides(overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{section: {key: value}}`` (nested where params.yaml nests) -> ``{"params.section.key": value}``."""
    return {"params." + ".".join(keys): value for keys, value in leaves(overrides)}


def check_points(params_path: Path, points: list[dict[str, Any]]) -> None:
    """Every point has a unique name and overrides that make valid params."""
    if not points:
        raise ValueError("sweep: no points given")
    if not isinstance(points, list) or not all(isinstance(point, dict) for point in points):
        raise ValueError(f"sweep: points must be a list of {{name, overrides}} mappings, got {points!r:.200}")
    names = [point.get("name") for point in points]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise ValueError(f"sweep: every point needs a unique 'name'; got {names}")
    for name in names:
        # The name becomes a DVC experiment, a git ref: checked here, not after the point's training.
        if not isinstance(name, str) or not EXPERIMENT_NAME.fullmatch(name) or name.endswith((".lock", ".")):
            raise ValueError(
                f"sweep point {name!r}: not usable as a DVC experiment name; use letters, digits, '.', "
                "'_' and '-', starting with a letter or digit (e.g. 'lr-3e-4'; quote a name that YAML "
                "would read as a number)"
            )
    for point in points:
        try:
            validated(params_path, point.get("overrides") or {})
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"sweep point {point['name']!r}: {error}") from error


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as CSV (columns: the union of every row's keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


@flow(name="imtok-sweep", log_prints=True)
def sweep(
    points: list[dict[str, Any]],
    project: str | None = None,
    stages: list[str] | None = None,
    table: str = f"{layout.REPORTS}/sweep.csv",
    remote: str | None = None,
    use_remote: bool = True,
    keep: dict[str, str] | None = None,
    experiments: bool = True,
) -> list[dict[str, Any]]:
    """Run the pipeline for each point; returns (and writes to ``table``) one row per point.

    experiments: save each point as a DVC experiment of its name. DVC saves only a whole pipeline's
        outputs: a sweep over some ``stages`` (the first stages of a fresh project) passes False.
    keep: ``{file: directory}`` (project-relative): after each point, a copy of the workspace file
        (e.g. ``plots/tokenizer_curves.csv``) as ``directory/<point name><suffix>``, where the next
        point cannot overwrite it.
    """
    root = project_root(project)
    params_path = root / "params.yaml"
    check_points(params_path, points)
    baseline = params_path.read_text()
    lock_path = root / "dvc.lock"
    baseline_lock = lock_path.read_text() if lock_path.is_file() else None
    # Outputs with cache: false (metrics, reports) are not in DVC's cache to check out again.
    uncached = uncached_snapshot(root)
    rows = []
    try:
        for point in points:
            write_text_atomic(params_path, baseline)
            result = pipeline(
                project=str(root),
                stages=stages,
                overrides=point.get("overrides") or {},
                experiment=point["name"] if experiments else None,
                remote=remote,
                use_remote=use_remote,
            )
            ran = [row["stage"] for row in result["stages"] if row["ran"]]
            print(f"sweep point {point['name']}: ran {ran}")
            rows.append(
                {
                    "name": point["name"],
                    "stages_ran": " ".join(ran),
                    **flat_overrides(point.get("overrides") or {}),
                    **result["metrics"],
                }
            )
            write_table(rows, root / table)  # a partial table survives a failing point
            for source, directory in (keep or {}).items():
                kept = root / directory / f"{point['name']}{Path(source).suffix}"
                kept.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(kept, (root / source).read_bytes())
    finally:
        write_text_atomic(params_path, baseline)
        if baseline_lock is not None:
            restore_outputs(root, lock_path, baseline_lock, uncached)
    return rows


def uncached_snapshot(root: Path) -> dict[str, bytes | None]:
    """The bytes of every ``cache: false`` output dvc.yaml declares (None where absent): DVC's cache
    holds no copy of them to check out again."""
    return {
        path: (root / path).read_bytes() if (root / path).is_file() else None
        for path in uncached_outputs(read_stages(root))
    }


def restore_outputs(
    root: Path, lock_path: Path, baseline_lock: str, uncached: dict[str, bytes | None]
) -> None:
    """Put back the dvc.lock the sweep found and the uncached outputs as they were (removing those it
    did not find), and check the cached ones out of DVC's cache, so the workspace is the baseline
    again (each point stays in its experiment). A baseline output the cache lacks cannot be checked
    out: a message says to pull or rerun it. (Where the sweep found no dvc.lock there is no baseline
    to go back to, and the last point's lock and outputs stay.)"""
    write_text_atomic(lock_path, baseline_lock)
    for path, content in uncached.items():
        if content is None:
            (root / path).unlink(missing_ok=True)
        else:
            write_bytes_atomic(root / path, content)
    try:
        dvc(root, "checkout", "--force")
    except DvcCommandError as error:
        print(
            f"sweep: params.yaml and dvc.lock are restored, but not every output: {error}; run `dvc pull` "
            "or `dvc repro` for the rest"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("points", type=Path, help="YAML list of {name, overrides}")
    parser.add_argument("--project", default=None)
    parser.add_argument("--table", default=f"{layout.REPORTS}/sweep.csv")
    parser.add_argument("--no-remote", action="store_true")
    args = parser.parse_args()
    try:
        points = read_yaml(args.points, "sweep points")
    except (OSError, ValueError) as error:
        parser.error(str(error))
    sweep(
        points=points,
        project=args.project,
        table=args.table,
        use_remote=not args.no_remote,
    )


if __name__ == "__main__":
    main()
