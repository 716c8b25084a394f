"""The DVC pipeline as a Prefect flow: one task per dvc.yaml stage, DVC decides what runs.

Each stage task runs ``dvc repro --single-item <stage>``, so DVC's cache and dvc.lock stay the
truth: a stage whose inputs did not change is skipped by DVC, not by the flow. With a DVC remote,
the stage's inputs are pulled first and its outputs pushed after, so a stage finds its data on any
host whose checkout has the same dvc.lock. Pull and push retry (remote storage is I/O); a stage
that fails is not retried. Stage tasks carry a ``gpu`` or ``cpu`` tag (``gpu`` for stages with a
``run.<section>.device``) for tag concurrency limits; the deployments in prefect.yaml place the pipeline
on the ``gpu`` work pool (the ``prepare`` deployment on ``cpu``).

    python -m flows.pipeline                       # every stage, here, Prefect's local API
    python -m flows.pipeline --stage train_prior   # one stage (its inputs must be current)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.dag import metric_writers, read_stages, select, uncached_outputs, upstream
from flows.dvc import DvcCommandError, DvcTransferError, dvc, lock_entry, save_experiment
from imtok import layout
from imtok.overrides import write_overrides

TRANSFER_RETRIES = 3
TRANSFER_DELAYS = [5, 30, 120]


def project_root(project: str | None) -> Path:
    """The project's root: the argument, else ``$IMTOK_PROJECT_DIR``, else the working directory."""
    root = Path(project or os.environ.get("IMTOK_PROJECT_DIR") or ".").resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root} has no dvc.yaml: pass project=<checkout> or set IMTOK_PROJECT_DIR")
    return root


def _only_transfer_errors(task, task_run, state) -> bool:
    """Retry condition: pull/push failures only."""
    try:
        state.result()
    except DvcTransferError:
        return True
    except Exception:  # anything else is not I/O
        return False
    return False


def transfer_task(name: str):
    """A Prefect task for a remote transfer: retried, but only on transfer errors."""
    return task(
        name=name,
        retries=TRANSFER_RETRIES,
        retry_delay_seconds=TRANSFER_DELAYS,
        retry_condition_fn=_only_transfer_errors,
        tags=["io"],
    )


@transfer_task("dvc-pull")
def pull_inputs(project: Path, stages: list[str], remote: str | None) -> None:
    """Fetch the outputs of ``stages`` (a stage's upstream) from the remote, by dvc.lock's hashes."""
    if stages:
        dvc(project, "pull", *_remote(remote), *stages)


@transfer_task("dvc-pull-outputs")
def pull_own_outputs(project: Path, stage: str, remote: str | None) -> None:
    """Fetch the stage's own outputs by dvc.lock's hashes where the remote has them (a stage that only
    lacks its outputs then needs no run); what the remote lacks is left for the stage to make."""
    dvc(project, "pull", "--allow-missing", *_remote(remote), stage)


def only_outputs_missing(project: Path, stage: str, uncached: set[str]) -> bool:
    """``dvc status`` finds nothing changed for ``stage`` but cached outputs missing from the
    workspace and the cache: a fresh checkout of a commit whose outputs another host pushed. Anything
    else means the stage must run: changed params, code or inputs, no lock entry, or a missing
    ``cache: false`` output (one of ``uncached``: reports, metrics), which git keeps and no remote can
    give back: commit those with dvc.lock."""
    output = dvc(project, "status", "--json", stage)
    found = [line for line in output.splitlines() if line.startswith("{")]
    entries = json.loads(found[-1]).get(stage, []) if found else []
    return bool(entries) and all(
        isinstance(entry, dict)
        and set(entry) == {"changed outs"}
        and all(
            state in ("not in cache", "deleted") and path not in uncached
            for path, state in entry["changed outs"].items()
        )
        for entry in entries
    )


@transfer_task("dvc-push")
def push_outputs(project: Path, stage: str, remote: str | None) -> None:
    """Upload the stage's cached outputs to the remote."""
    dvc(project, "push", *_remote(remote), stage)


@task(name="dvc-repro", retries=0)
def reproduce(project: Path, stage: str) -> dict[str, Any]:
    """``dvc repro --single-item``: runs the stage when its inputs changed, else DVC skips it."""
    started = time.perf_counter()
    output = dvc(project, "repro", "--single-item", stage)
    ran = f"Running stage '{stage}'" in output
    get_run_logger().info("%s: %s", stage, "ran" if ran else "unchanged, skipped by DVC")
    return {
        "stage": stage,
        "ran": ran,
        "seconds": round(time.perf_counter() - started, 2),
        "lock": lock_entry(project, stage),
    }


def _remote(remote: str | None) -> list[str]:
    return ["--remote", remote] if remote else []


def has_remote(project: Path, remote: str | None) -> bool:
    """A remote is named, or dvc has a default one."""
    if remote:
        return True
    try:
        return bool(dvc(project, "remote", "default").strip())
    except DvcCommandError:  # "No default remote set"
        return False


def read_metrics(project: Path, files: list[str]) -> dict[str, Any]:
    """The metric files ``files`` (project-relative ``metrics/*.json``) flattened to
    ``file.key.subkey`` -> value; a file that is not there gives nothing."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        else:
            flat[prefix] = value

    for name in sorted(files):
        path = project / name
        if path.is_file():
            walk(path.stem, json.loads(path.read_text()))
    return flat


@flow(name="imtok-pipeline", log_prints=True)
def pipeline(
    project: str | None = None,
    stages: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    experiment: str | None = None,
    remote: str | None = None,
    use_remote: bool = True,
) -> dict[str, Any]:
    """Reproduce the pipeline stage by stage (all, or the named ``stages``).

    overrides: ``{section: {key: value}}`` written into params.yaml (validated first); with
        ``experiment`` the result is saved as that DVC experiment (``dvc exp save``).
    remote: the DVC remote to pull from and push to (default: the repository's default remote;
        none configured means local cache only). ``use_remote=False`` never touches a remote.
    """
    root = project_root(project)
    all_stages = read_stages(root)
    chosen = select(all_stages, stages)
    write_overrides(root / "params.yaml", overrides)
    transfer = use_remote and has_remote(root, remote)
    uncached = set(uncached_outputs(all_stages))
    results = []
    for stage in chosen:
        tags = {stage.pool, f"stage:{stage.name}"}
        if transfer:
            pull_inputs.with_options(tags={"io", stage.pool})(root, upstream(all_stages, stage.name), remote)
            if stage.outs and only_outputs_missing(root, stage.name, uncached):  # pushed by another host
                pull_own_outputs.with_options(tags={"io", stage.pool})(root, stage.name, remote)
        results.append(reproduce.with_options(name=f"repro-{stage.name}", tags=tags)(root, stage.name))
        if transfer and stage.outs:
            push_outputs.with_options(tags={"io", stage.pool})(root, stage.name, remote)
    if experiment:
        save_experiment(root, experiment)
    # A metric file describes this run only when the stage that writes it was reproduced here (run,
    # or skipped by DVC as current); the others are an earlier run's and are left out.
    missing = metric_writers(all_stages) - {stage.name for stage in chosen}
    if missing:
        get_run_logger().info("metrics left out: %s not among the stages run", ", ".join(sorted(missing)))
    files = [path for stage in chosen for path in stage.metrics if path.startswith(f"{layout.METRICS}/")]
    return {"stages": results, "metrics": read_metrics(root, files), "experiment": experiment}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=None)
    parser.add_argument("--stage", action="append", dest="stages", help="repeatable")
    parser.add_argument("--remote", default=None)
    parser.add_argument("--no-remote", action="store_true")
    parser.add_argument("--experiment", default=None)
    parser.add_argument(
        "--overrides", type=json.loads, default=None, help='JSON, e.g. {"prior": {"depth": 4}}'
    )
    args = parser.parse_args()
    result = pipeline(
        project=args.project,
        stages=args.stages,
        overrides=args.overrides,
        experiment=args.experiment,
        remote=args.remote,
        use_remote=not args.no_remote,
    )
    for row in result["stages"]:
        print(f"{row['stage']:18s} {'ran' if row['ran'] else 'skipped':8s} {row['seconds']:8.1f} s")


if __name__ == "__main__":
    main()
