"""The command line every stage shares: SIGTERM unwinds the stage, and the caller's handler comes back."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from stages.common import stage_main, terminate_gracefully

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _own_handler(signum, frame):  # stands in for a handler the embedding program set
    raise AssertionError("the stage's handler should have been in place")


@pytest.fixture
def caller_handler():
    previous = signal.signal(signal.SIGTERM, _own_handler)
    yield _own_handler
    signal.signal(signal.SIGTERM, previous)


def test_the_callers_handler_is_back_after_the_stage_returns_fails_or_raises(caller_handler):
    seen = []

    def works(params, args):
        seen.append(signal.getsignal(signal.SIGTERM))
        return None

    def bad_input(params, args):
        raise ValueError("shard 3 is empty")

    def crashes(params, args):
        raise RuntimeError("bug")

    assert stage_main("doc", works, report_path=None, argv=["--params", str(PARAMS)]) == 0
    assert seen == [terminate_gracefully]
    assert signal.getsignal(signal.SIGTERM) is caller_handler
    assert stage_main("doc", bad_input, report_path=None, argv=["--params", str(PARAMS)]) == 1
    assert signal.getsignal(signal.SIGTERM) is caller_handler
    with pytest.raises(RuntimeError, match="bug"):
        stage_main("doc", crashes, report_path=None, argv=["--params", str(PARAMS)])
    assert signal.getsignal(signal.SIGTERM) is caller_handler


def test_sigterm_ends_the_stage_with_143_and_its_mlflow_run_failed(caller_handler, tmp_path, monkeypatch):
    import mlflow

    from imtok import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    started = {}

    def terminated_mid_run(params, args):
        with tracking.stage_run("probe", {"a": 1}, system_metrics=False) as run:
            started["run_id"] = run.info.run_id
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises long before this ends
        raise AssertionError("SIGTERM did not unwind the stage")

    before = time.monotonic()
    with pytest.raises(SystemExit) as ended:
        stage_main("doc", terminated_mid_run, report_path=None, argv=["--params", str(PARAMS)])
    assert ended.value.code == 128 + signal.SIGTERM
    assert time.monotonic() - before < 25
    assert signal.getsignal(signal.SIGTERM) is caller_handler
    status = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]).get_run(started["run_id"])
    assert status.info.status == "FAILED"


def test_a_stage_run_from_another_thread_leaves_the_process_handler_alone(caller_handler):
    outcome = {}

    def works(params, args):
        outcome["handler"] = signal.getsignal(signal.SIGTERM)
        return None

    def call():
        outcome["code"] = stage_main("doc", works, report_path=None, argv=["--params", str(PARAMS)])

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(timeout=60)
    assert outcome == {"code": 0, "handler": caller_handler}
    assert signal.getsignal(signal.SIGTERM) is caller_handler
