"""Pieces the stage scripts share: swapping in a finished output directory, the end of a training
stage (export, register, summary), writing reports, the stage's MLflow run and its process life."""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imtok import layout
from imtok.atomic import match_mode, write_text_atomic

# The domain classifier's model file: train_classifier writes it, the two evaluations read it.
CLASSIFIER_PATH = Path(layout.CLASSIFIER) / "classifier.pt"

STAGING_MARK = "staging-"
RETIRED_MARK = "retired-"


def replace_directory(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Let ``fill`` write a staging directory beside ``out_dir``, then swap it in.

    Readers never see a half-written output: until the swap the old directory (or none) is there. The
    old one is renamed aside before the new one is renamed in, so it is gone only for the instant
    between two renames (not for a whole ``rmtree``), and deleted after. Staging and retired
    directories that a killed run left beside ``out_dir`` are removed first. The new directory gets the
    old one's mode (or a plain ``mkdir``'s), not ``mkdtemp``'s private 0700.
    """
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    name = glob.escape(out_dir.name)
    retired_before = sorted(parent.glob(f".{name}.{RETIRED_MARK}*"), key=lambda path: path.stat().st_mtime)
    if retired_before and not out_dir.exists():  # killed between the two renames: the old output is back
        os.replace(retired_before.pop(), out_dir)
    for leftover in [*parent.glob(f".{name}.{STAGING_MARK}*"), *retired_before]:
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{STAGING_MARK}", dir=parent))
    retired = staging.with_name(staging.name.replace(STAGING_MARK, RETIRED_MARK, 1))
    try:
        fill(staging)
        match_mode(staging, out_dir)
        if out_dir.exists():
            os.replace(out_dir, retired)
        try:
            os.replace(staging, out_dir)
        except BaseException:
            if retired.exists() and not out_dir.exists():
                os.replace(retired, out_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a file that does not parse raises a ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path}: damaged, not JSON ({error}); run the stage that writes it again (dvc repro)"
        ) from None


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write JSON atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(content, indent=2) + "\n")


def terminate_gracefully(signum: int, _frame: Any) -> None:
    """SIGTERM handler (a scheduler's cancel, a job time limit): unwind like Ctrl-C, so the MLflow run
    ends FAILED and the last checkpoint stays for the re-run to resume from."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM raises SystemExit (`terminate_gracefully`); the caller's handler is back
    after it. Only the main thread can set a handler: called from another thread (a stage's ``main``
    run by a scheduler's thread) the block runs with the process's handler unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate_gracefully)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish"}
PR_SET_PDEATHSIG = 1  # prctl(2) option: a signal this process gets when its parent ends


def shell_wrapper(pid: int) -> bool:
    """Whether process ``pid`` is a ``<shell> -c <command>`` wrapper, as DVC runs each stage command
    (``$SHELL -c cmd``; dash does not exec the command in its place, so the stage is its child)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = os.path.basename(argv[0].decode(errors="replace"))
    return len(argv) >= 3 and name in SHELLS and argv[1] == b"-c"


def watch_process(pid: int) -> None:
    """SIGTERM this process when process ``pid`` ends (a daemon thread waits on its pidfd, so a
    recycled PID cannot fool it); a process already gone is signalled at once."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def wait() -> None:
        select.select([handle], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name=f"watch-{pid}", daemon=True).start()


def end_with_dvc() -> None:
    """Under DVC (``dvc repro``, ``dvc exp run``: ``DVC_STAGE`` is set), end this stage when DVC ends.

    A ``kill -9`` of ``dvc repro`` used to leave the stage running under PID 1; a later ``dvc repro``
    checked out the cached outputs, and the orphan then overwrote them. Now the stage gets SIGTERM
    (which unwinds: no output is swapped in, the last checkpoint stays) when its parent ends (Linux's
    parent-death signal), and, when that parent is the ``$SHELL -c`` wrapper DVC runs commands in,
    when DVC itself ends. Run by hand (no ``DVC_STAGE``), a stage outlives its shell as before, so
    ``nohup`` keeps working. Elsewhere than Linux this does nothing.
    """
    if "DVC_STAGE" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # the parent ended before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    if shell_wrapper(parent):
        stat = Path(f"/proc/{parent}/stat").read_text()
        dvc = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name
        if dvc > 1:
            watch_process(dvc)
        else:  # the wrapper was handed to init: DVC ended before this stage got here
            os.kill(os.getpid(), signal.SIGTERM)


Work = Callable[[Any, argparse.Namespace], "dict[str, Any] | None"]


def stage_main(
    doc: str,
    work: Work,
    *,
    report_path: Path | None,
    argv: list[str] | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line every stage shares: ``--params``, ``--report``, logging, exit codes.

    ``work(params, args)`` does the stage's job and returns its report (written to ``--report``
    atomically) or None. Bad params or input (ValueError, FileNotFoundError, a damaged shard) and a
    process group that did not form end with exit code 1 and one log line saying what to fix; SIGTERM
    unwinds like Ctrl-C.
    """
    from imtok.data.shards import ShardError
    from imtok.params import load_params
    from imtok.runtime import ProcessGroupError

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    if report_path is not None:
        parser.add_argument("--report", type=Path, default=report_path)
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("stages")
    with sigterm_unwinds():
        end_with_dvc()
        try:
            report = work(load_params(args.params), args)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise  # a parser's message names no file: the traceback shows which read failed
        except (ValueError, FileNotFoundError, ShardError, ProcessGroupError) as exc:  # says why
            log.error("%s", exc)
            return 1
    if report is not None and report_path is not None:
        write_json(args.report, report)
        log.info("report written to %s", args.report)
    return 0


def no_register_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-register", action="store_true", help="do not log the model to MLflow")


@contextlib.contextmanager
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


def export_model(
    out_dir: Path,
    *,
    kind: str,
    model_file: str,
    config: Any,
    model: Any,
    summary: dict[str, Any],
    registration: Callable[[], Registration] | None,
    also: Callable[[Path], None] | None = None,
) -> None:
    """The end of every training stage: export, register, record.

    The weights-only model file (``imtok.models.files``), anything ``also(staging)`` adds and the
    summary ``<model_file stem>.json`` (with the file's SHA-256) are swapped in as one directory.
    With ``registration`` (called once the files are in place) the model is then logged and
    registered, and the summary is written again
    with where it landed (name, version, ``models:/`` URIs). The files come first so that an
    unreachable registry loses nothing: the stage fails naming the file that is safe, and a re-run
    resumes at the last step and registers. The summary is logged to the stage's run.
    """
    from imtok import registry, tracking
    from imtok.models.files import file_sha256, save_model_file

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
