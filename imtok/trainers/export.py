"""The end every training stage shares: its MLflow run, held together with its checkpoints
(``training_run``), and the trained model recorded, exported and registered (``finish_training``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imtok.atomic import replace_directory, write_json


@contextmanager
def training_run(
    stage: str, logged: dict[str, Any], tags: dict[str, str], checkpoint_dir: Path, is_main: bool
) -> Iterator[Any]:
    """The MLflow run of a training stage on the main process (None elsewhere), with
    ``checkpoint_dir`` held for this run (``imtok.training.holding_checkpoints``).

    When ``checkpoint_dir`` holds a checkpoint, the run it recorded is continued, so a killed and
    resumed execution keeps one run and one metric history.
    """
    if not is_main:
        yield None
        return
    from imtok import tracking
    from imtok.training import holding_checkpoints, latest_checkpoint, read_checkpoint

    with holding_checkpoints(checkpoint_dir):
        latest = latest_checkpoint(checkpoint_dir)
        resume_run_id = read_checkpoint(latest)["extra"].get("mlflow_run_id") if latest else None
        with tracking.stage_run(stage, logged, tags=tags, resume_run_id=resume_run_id) as run:
            yield run


@dataclass(frozen=True)
class Registration:
    """How a training stage registers its model (``imtok.registry.log_registered_model``)."""

    name: str
    input_shape: tuple[int, ...]
    version_tags: dict[str, Any]
    description: str  # the version's one line in the registry
    model_description: str  # what every version of ``name`` is
    input_dtype: str = "float32"


def finish_training(
    out_dir: Path,
    *,
    stage: str,
    kind: str,
    model_file: str,
    config: Any,
    result: Any,
    final: dict[str, float],
    run: Any,
    run_key: str,
    commit: str | None,
    runtime: Any,
    summary: dict[str, Any],
    report: dict[str, Any],
    registration: Callable[[], Registration] | None,
    also: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """The end of every training stage, once its model (``result.model`` of the trainer's ``result``)
    is trained and measured on val (``final``): record, export, register; returns the stage report.

    The ``final/`` metrics go to the stage's MLflow ``run``. The weights-only model file
    (``imtok.models.files``), anything ``also(staging)`` adds and the summary ``<model_file stem>.json``
    (the keys every stage writes around the stage's own ``summary``, and the file's SHA-256) are
    swapped in as one directory. With ``registration`` (called once the files are in place) the model
    is then logged and registered, and the summary is written again with where it landed (name,
    version, ``models:/`` URIs). The files come first so that an unreachable registry loses nothing:
    the stage fails naming the file that is safe, and a re-run resumes at the last step and registers.
    The summary is logged to the run. The report holds the keys every stage reports around ``report``.
    """
    from imtok import registry, tracking
    from imtok.models.files import file_sha256, save_model_file

    tracking.log_metrics({f"final/{name}": value for name, value in final.items()}, result.step)
    model = result.model.cpu()
    summary = {
        **{"stage": stage, "step": result.step, "fingerprint": run_key, **summary},
        **{"git_commit": commit, "mlflow_run_id": run.info.run_id, "val": final},
    }
    summary_file = Path(model_file).with_suffix(".json").name

    def fill(staging: Path) -> None:
        save_model_file(staging / model_file, kind=kind, config=config, model=model, meta=summary)
        if also is not None:
            also(staging)
        summary["sha256"] = file_sha256(staging / model_file)
        write_json(staging / summary_file, summary)

    replace_directory(out_dir, fill)
    if registration is not None:
        spec = registration()
        registered = registry.log_registered_model(
            model,
            registered_name=spec.name,
            input_shape=spec.input_shape,
            input_dtype=spec.input_dtype,
            model_file=out_dir / model_file,
            version_tags=spec.version_tags,
            description=spec.description,
            model_description=spec.model_description,
        )
        summary["registered_model"] = {
            "name": registered.name,
            "version": registered.version,
            "uri": registered.uri,
            "model_uri": registered.model_uri,
        }
        write_json(out_dir / summary_file, summary)
    tracking.log_artifact(out_dir / summary_file)
    return {
        **{"step": result.step, "resumed_from_step": result.start_step, "seconds": round(result.seconds, 2)},
        **report,
        **{"precision": runtime.precision, "world_size": runtime.world_size},
        "val": {name: round(value, 5) for name, value in final.items()},
    }
