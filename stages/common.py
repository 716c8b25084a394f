"""What every stage script shares: the command line (``--params``, ``--report``, exit codes), the
report written atomically, and the process's life (SIGTERM unwinds; under DVC the stage ends with
DVC). The work itself is library code: each stage calls one function of ``imtok``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imtok import layout
from imtok.atomic import write_json

# The domain classifier's model file: train_classifier writes it, the two evaluations read it.
CLASSIFIER_PATH = Path(layout.CLASSIFIER) / "classifier.pt"


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
