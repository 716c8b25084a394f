"""The MLflow model registry: logging and registering a trained model (its version's tags and one-line
description, the ``candidate`` alias), resolving a registry URI to the weights-only model file, and
the promotion rule that moves the ``champion`` alias.

Models are logged with ``mlflow.pytorch.log_model`` in the pickle format, so that
``mlflow.pytorch.load_model`` returns the real module (a ``Tokenizer`` with ``encode``/``decode``), not
a ``torch.export`` graph. MLflow refuses to unpickle unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``
is set by whoever trusts the store. imtok's own stages never unpickle: each logged model also carries
its weights-only model file (``extra_files/``), which ``fetched_model_file`` fetches (into a temporary
directory removed after use) and ``imtok.models.files.load_tokenizer`` / ``load_prior`` read.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imtok.tracking import TrackingUnavailable, configure, is_server, tracking_uri

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
# How long the end of a training stage retries registering its model when the server is away.
REGISTER_WAIT_S = float(os.environ.get("IMTOK_REGISTER_WAIT_S", "120"))


@dataclass(frozen=True)
class RegisteredModel:
    """Where a logged model landed: its ``models:/name/version`` URI and the run's model URI."""

    name: str
    version: str
    model_uri: str  # models:/<model id>, the logged model itself

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def log_registered_model(
    model: Any,
    *,
    registered_name: str,
    input_shape: tuple[int, ...],
    model_file: str | os.PathLike[str],
    input_dtype: str = "float32",
    version_tags: Mapping[str, Any],
    description: str = "",
    model_description: str = "",
    alias: str = CANDIDATE_ALIAS,
    artifact_name: str = "model",
) -> RegisteredModel:
    """Log ``model`` to the active run, register it, tag and describe the version (``description``:
    the one line the registry's version list shows) and point ``alias`` at it. A registered model
    without a description gets ``model_description`` (what its versions are; a user's own text stays).

    ``input_shape`` and ``input_dtype`` describe one sample of the input in the signature (the batch
    dimension is free): float32 images for a tokenizer, int64 token grids for a prior.
    ``pip_requirements`` are given rather than inferred: inference imports and probes the model and
    costs seconds per call. The module's own package (imtok) must be importable where it is loaded.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(input_dtype), (-1, *input_shape))]))

    def register() -> RegisteredModel:
        info = mlflow.pytorch.log_model(
            model,
            name=artifact_name,
            serialization_format="pickle",
            signature=signature,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            extra_files=[str(model_file)],
            registered_model_name=registered_name,
        )
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        for name, value in version_tags.items():
            client.set_model_version_tag(registered_name, version, name, str(value))
        if description:
            client.update_model_version(registered_name, version, description=description)
        if model_description and not client.get_registered_model(registered_name).description:
            client.update_registered_model(registered_name, description=model_description)
        client.set_registered_model_alias(registered_name, alias, version)
        log.info("registered %s version %s with alias %s", registered_name, version, alias)
        return RegisteredModel(registered_name, version, info.model_uri)

    deadline = time.monotonic() + REGISTER_WAIT_S
    while True:
        try:
            return register()
        except Exception as error:  # an unreachable store: retried within REGISTER_WAIT_S
            if not is_server(tracking_uri()):
                raise
            if time.monotonic() + 5.0 > deadline:
                raise TrackingUnavailable(
                    f"MLFLOW_TRACKING_URI={tracking_uri()}: could not register {registered_name} "
                    f"({str(error).splitlines()[0][:200]}); the trained model is safe in {model_file}. "
                    "When the server answers again, run the stage again: it resumes from its newest "
                    "checkpoint, trains no further, and registers the model"
                ) from None
            log.warning("registering %s failed (%s); trying again", registered_name, str(error)[:120])
            time.sleep(5.0)


def is_model_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names an MLflow model (``models:/``, ``runs:/``) rather than a local path."""
    return str(location).startswith(("models:/", "runs:/"))


@contextmanager
def fetched_model_file(location: str | os.PathLike[str], filename: str) -> Iterator[Path]:
    """The local path of model file ``filename`` given a directory, the file itself or an MLflow URI.

    A context manager: for a URI only the weights-only model file is downloaded (from ``extra_files/``
    of the logged model), never unpickled, into a temporary directory that is removed on leaving the
    block, so repeated loads leave no copies of the weights behind. A URI that does not resolve raises
    a ValueError naming it. Local paths are yielded as they are and never touched.
    """
    if not is_model_uri(location):
        path = Path(location)
        yield path / filename if path.is_dir() else path
        return
    mlflow = configure()
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="imtok-model-") as target:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{str(location).rstrip('/')}/extra_files/{filename}", dst_path=target
            )
        except (MlflowException, OSError) as error:
            raise ValueError(
                f"{location}: cannot fetch {filename} from the MLflow store at {tracking_uri()} ({error}); "
                "check the model name, version or alias and MLFLOW_TRACKING_URI"
            ) from None
        yield Path(local)


@dataclass(frozen=True)
class Promotion:
    """What ``promote_if_better`` decided, and why (also stored as a tag on the version)."""

    promoted: bool
    reason: str


def promotion_decision(
    metric: str,
    value: float,
    holder: str | None,
    held: float | None,
    *,
    same_version: bool = False,
    higher_is_better: bool,
    alias: str = CHAMPION_ALIAS,
) -> tuple[bool, str]:
    """The promotion rule, without MLflow: whether a candidate whose ``metric`` is ``value`` takes
    ``alias`` from version ``holder`` (None: nobody holds it) whose value is ``held`` (None: it has no
    value on this metric, so it cannot be compared and is replaced), and the reason in words."""
    if holder is None:
        return True, f"first {alias}: {metric}={value:.6g}"
    if same_version:
        return True, f"already {alias}: {metric}={value:.6g}"
    if held is None:
        return True, f"replaces version {holder}, which has no {metric} to compare ({metric}={value:.6g})"
    promoted = value > held if higher_is_better else value < held
    verdict = "beats" if promoted else "does not beat"
    direction = "higher" if higher_is_better else "lower"
    return promoted, f"{metric}={value:.6g} {verdict} version {holder}'s {held:.6g} ({direction} is better)"


def promote_if_better(
    registered_name: str,
    version: str,
    metric: str,
    value: float,
    *,
    higher_is_better: bool,
    alias: str = CHAMPION_ALIAS,
) -> Promotion:
    """Point ``alias`` at ``version`` when its ``metric`` beats the current holder's (or there is none).

    Each evaluated version carries its value as the tag ``eval.<metric>``; the champion's tag is what
    a candidate is compared with. A champion without that tag (evaluated on another metric) cannot be
    compared, and is replaced, with the reason saying so. The reason goes to the version's tag
    ``imtok.promotion``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    configure()
    client = mlflow.MlflowClient()
    if not math.isfinite(value):
        reason = f"not promoted: {metric} is {value}"
        client.set_model_version_tag(registered_name, version, "imtok.promotion", reason)
        return Promotion(False, reason)
    client.set_model_version_tag(registered_name, version, f"eval.{metric}", repr(float(value)))
    try:
        holder = client.get_model_version_by_alias(registered_name, alias)
    except MlflowException:
        holder = None
    held = None
    if holder is not None and str(holder.version) != str(version):
        held = holder.tags.get(f"eval.{metric}")
    promoted, reason = promotion_decision(
        metric,
        value,
        None if holder is None else str(holder.version),
        None if held is None else float(held),
        same_version=holder is not None and str(holder.version) == str(version),
        higher_is_better=higher_is_better,
        alias=alias,
    )
    if promoted:
        client.set_registered_model_alias(registered_name, alias, version)
    client.set_model_version_tag(registered_name, version, "imtok.promotion", reason)
    log.info("%s version %s: %s", registered_name, version, reason)
    return Promotion(promoted, reason)
