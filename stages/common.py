"""Pieces the stage scripts share: swapping in a finished output directory, writing reports."""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imtok.atomic import match_mode, write_text_atomic

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


def training_run(
    stage: str, logged: dict[str, Any], tags: dict[str, str], checkpoint_dir: Path, is_main: bool
) -> contextlib.AbstractContextManager[Any]:
    """The MLflow run of a training stage on the main process (a no-op context elsewhere).

    When ``checkpoint_dir`` holds a checkpoint, the run it recorded is continued, so a killed and
    resumed execution keeps one run and one metric history.
    """
    if not is_main:
        return contextlib.nullcontext()
    from imtok import tracking
    from imtok.training import latest_checkpoint, read_checkpoint

    latest = latest_checkpoint(checkpoint_dir)
    resume_run_id = read_checkpoint(latest)["extra"].get("mlflow_run_id") if latest else None
    return tracking.stage_run(stage, logged, tags=tags, resume_run_id=resume_run_id)
