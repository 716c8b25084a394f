"""MLflow runs: the store and experiment, one run per stage execution, metrics, artifacts and tags
(the model registry is ``imtok.registry``).

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db`` in the working
directory, with artifacts under ``./mlruns``), the experiment from ``MLFLOW_EXPERIMENT_NAME`` (default
``imtok``): pointing at an MLflow server is configuration. ``mlflow`` is imported inside the functions
because importing it costs seconds that library users and most tests do not need to pay.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "imtok"
# MLflow caps a param value at 6000 characters; longer values (long lists) are cut with a marker.
MAX_PARAM_LENGTH = 6000


# How long a stage waits for the MLflow server it is pointed at before it gives up (at start), and how
# long the end of a run waits for metrics held back during an outage and for the model's registration.
START_WAIT_S = 20.0
FLUSH_WAIT_S = float(os.environ.get("IMTOK_FLUSH_WAIT_S", "30"))
# MLflow's own HTTP retries (7, with backoff) made one call to a dead server take 252 s; a stage's
# calls go through these shorter ones, and the waits above bound the whole.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


_answered: set[str] = set()  # server URIs whose /health answered in this process

# MLflow 3's UI opens an experiment on its GenAI overview (traces, evaluations: all empty for us) unless
# the page's workflowType says otherwise; the tag is what the UI reads where that switch is off.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
RUNS_VIEW = "workflowType=machine_learning"


def runs_url(base: str, experiment_id: str) -> str:
    """The UI page of an experiment's training runs (not the GenAI overview a bare link opens)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{RUNS_VIEW}"


def mark_training_experiment(mlflow: Any, experiment: Any) -> None:
    """Tag the experiment as model training (once; best effort: the tag is for the UI only)."""
    key, value = EXPERIMENT_KIND_TAG
    if experiment.tags.get(key) == value:
        return
    try:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    except Exception as error:
        log.warning("could not tag experiment %s as model training: %s", experiment.name, error)


class TrackingUnavailable(ValueError):
    """The MLflow server is not there: the message names MLFLOW_TRACKING_URI and what to do."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(wait_s: float = START_WAIT_S) -> None:
    """For an ``http(s)`` tracking URI, wait up to ``wait_s`` for the server's ``/health``; then raise
    ``TrackingUnavailable`` naming ``MLFLOW_TRACKING_URI``, the address and what to do. A stage calls
    this before it trains or replaces anything. File and database URIs need no server."""
    import urllib.error
    import urllib.request

    uri = tracking_uri()
    if not is_server(uri):
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return
                why = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            why = f"HTTP {error.code}"
        except OSError as error:
            why = str(getattr(error, "reason", error))
        if time.monotonic() + 2.0 > deadline:
            break
        time.sleep(2.0)
    raise TrackingUnavailable(
        f"MLFLOW_TRACKING_URI={uri}: no MLflow server answered at {uri.rstrip('/')}/health for "
        f"{wait_s:.0f} s ({why}); start it (make ui, or infra/), correct the address, or unset "
        f"MLFLOW_TRACKING_URI to log to {DEFAULT_TRACKING_URI} here. Nothing was trained or replaced."
    )


def configure() -> Any:
    """Import mlflow, point it at the configured store and experiment, and return the module; a server
    URI gets bounded HTTP retries (``HTTP_DEFAULTS``, unless set in the environment)."""
    import mlflow

    uri = tracking_uri()
    if is_server(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if uri not in _answered:
            check_server()
            _answered.add(uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.set_experiment(experiment_name())
    except mlflow.exceptions.MlflowException as error:
        if is_server(uri) and ("401" in str(error) or "403" in str(error)):
            raise TrackingUnavailable(
                f"MLFLOW_TRACKING_URI={uri}: the server refused this client ({str(error)[:120]}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of its basic-auth app "
                "(infra/.env: MLFLOW_ADMIN_USER, MLFLOW_ADMIN_PASSWORD). Nothing was trained or replaced."
            ) from error
        raise
    mark_training_experiment(mlflow, experiment)
    return mlflow


class MetricSender:
    """Sends a run's metrics from a background thread, so an outage of the server never stalls the
    training loop: ``add`` only queues (with the time it was measured), the thread sends in batches
    and keeps what failed for the next try, and ``close`` waits a bounded time for the rest."""

    BATCH = 500  # MLflow's log_batch takes at most 1000 metrics

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.pending: deque[Any] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.outage_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="imtok-mlflow-metrics", daemon=True)
        self.thread.start()

    def add(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        with self.lock:
            self.pending.extend(Metric(name, float(value), stamp, step) for name, value in metrics.items())
        self.wake.set()

    def _send_some(self) -> bool:
        """Send one batch; False when the server refused it (the batch stays queued)."""
        with self.lock:
            batch = [self.pending[i] for i in range(min(self.BATCH, len(self.pending)))]
        if not batch:
            return True
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as error:  # any failure to reach the store: keep the metrics, try later
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                log.warning(
                    "MLflow at %s does not answer (%s): training goes on, metrics are kept and sent "
                    "when it is back",
                    tracking_uri(),
                    str(error).splitlines()[0][:200],
                )
            return False
        with self.lock:
            for _ in batch:
                self.pending.popleft()
        if self.outage_since is not None:
            log.warning(
                "MLflow is back after %.0f s: sending the metrics kept meanwhile",
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None
        return True

    def _run(self) -> None:
        backoff = 1.0
        while True:
            self.wake.wait(timeout=backoff if self.outage_since else 5.0)
            self.wake.clear()
            if self.stopping:
                return
            while self.pending and self._send_some():
                backoff = 1.0
            if self.outage_since is not None:
                backoff = min(backoff * 2, 15.0)

    def close(self, wait_s: float = FLUSH_WAIT_S) -> int:
        """Stop the thread, then send what is queued for up to ``wait_s``; the count left unsent."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=wait_s)
        deadline = time.monotonic() + wait_s
        while self.pending and time.monotonic() < deadline:
            if not self._send_some():
                time.sleep(1.0)
        return len(self.pending)


_sender: MetricSender | None = None  # the active stage run's, when there is one
_lost = {"artifacts": 0, "tags": 0}


def git_commit(cwd: str | os.PathLike[str] = ".") -> str:
    """The checked-out commit (with ``-dirty`` when tracked files differ), or ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as ``{"section.key": "value"}`` strings, the way MLflow stores them."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = str(list(value) if isinstance(value, tuple) else value)
            flat[name] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return flat


def _existing_run(client: Any, run_id: str | None) -> str | None:
    """``run_id`` when this store holds that run and it can go on, else None: a checkpoint from another
    store, or a run someone deleted (MLflow refuses to restart a deleted run)."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        log.warning("MLflow run %s is not in %s: starting a new run", run_id, tracking_uri())
        return None
    if run.info.lifecycle_stage == "deleted":
        log.warning("MLflow run %s was deleted from %s: starting a new run", run_id, tracking_uri())
        return None
    return run_id


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    *,
    tags: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
    system_metrics: bool = True,
) -> Iterator[Any]:
    """An active MLflow run for one execution of ``stage``, with params and standard tags logged.

    ``resume_run_id`` (from a checkpoint) continues that run when the store has it, so a run killed
    and resumed keeps one metric history. The run ends FINISHED, or FAILED when the block raises.
    """
    global _sender
    mlflow = configure()
    client = mlflow.MlflowClient()
    run_id = _existing_run(client, resume_run_id)
    all_tags = {"imtok.stage": stage, "mlflow.source.git.commit": git_commit(), **(tags or {})}
    run = mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else stage,
        tags=all_tags,
        log_system_metrics=system_metrics,
    )
    _sender = MetricSender(client, run.info.run_id)
    _lost.update(artifacts=0, tags=0)
    status = "FAILED"
    try:
        if run_id is None:
            mlflow.log_params(flatten(params))
        else:
            mlflow.set_tags(all_tags)
            mlflow.set_tag("imtok.resumed", "true")
        yield run
        status = "FINISHED"
    finally:
        sender, _sender = _sender, None
        unsent = sender.close()
        lost = {"metrics": unsent, **_lost}
        if any(lost.values()):
            log.warning(
                "MLflow at %s was unreachable: %s never reached run %s",
                tracking_uri(),
                ", ".join(f"{count} {what}" for what, count in lost.items() if count),
                run.info.run_id,
            )
        _end_run(mlflow, status)


def _end_run(mlflow: Any, status: str) -> None:
    """End the active run; a server that does not answer leaves it RUNNING in the UI, with a warning,
    instead of failing the stage after its work is done."""
    try:
        mlflow.end_run(status=status)
    except Exception as error:  # the store is unreachable: the outputs on disk are what count
        log.warning(
            "could not mark the MLflow run %s at %s (%s); the UI shows it RUNNING",
            status,
            tracking_uri(),
            str(error).splitlines()[0][:200],
        )


def log_metrics(metrics: Mapping[str, float], step: int) -> None:
    """Queue metrics for the active stage run (``MetricSender``: never blocks); outside a stage run,
    log them directly."""
    if _sender is not None:
        _sender.add(metrics, step)
        return
    import mlflow

    mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)


def _best_effort(what: str, call: Callable[[], Any]) -> None:
    """Run ``call`` inside a stage run; a store that does not answer costs a warning and a count, not
    the stage (outside a stage run the error propagates)."""
    if _sender is None:
        call()
        return
    try:
        call()
    except Exception as error:  # unreachable store: what is on disk stays, the end of the run reports it
        _lost[what] += 1
        log.warning(
            "MLflow at %s: could not log %s (%s)", tracking_uri(), what, str(error).splitlines()[0][:200]
        )


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    import mlflow

    _best_effort("artifacts", lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path))


def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    _best_effort("tags", lambda: mlflow.set_tags({name: str(value) for name, value in tags.items()}))
