"""The Prefect pipeline flow, in Prefect's test harness, against `dvc repro` of the same project."""

from __future__ import annotations

import json

import pytest
import yaml
from project_factory import STAGES, TINY_PARAMS, environment, make_project, run

from imtok.overrides import merged


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def lock_stages(text: str) -> dict:
    return yaml.safe_load(text)["stages"]


# Files that record their run, so differ between any two runs (two `dvc repro`s as well): model
# directories hold the MLflow run id and git commit, token shards the tokenizer file's checksum,
# reports the wall-clock timings. Everything else must hash the same.
RUN_RECORDS = ("models/", "reports/", "data/tokens/")


def hashes(entry: dict) -> dict:
    """A lock entry's command, params, dep and out paths, and the hashes of run-independent files."""

    def files(kind: str) -> dict:
        return {
            item["path"]: None if item["path"].startswith(RUN_RECORDS) else item.get("md5")
            for item in entry.get(kind, [])
        }

    return {"cmd": entry["cmd"], "params": entry.get("params"), "deps": files("deps"), "outs": files("outs")}


@pytest.mark.slow
def test_the_flow_writes_the_lock_dvc_repro_writes_then_dvc_has_nothing_to_do(
    tmp_path, harness, monkeypatch, reproduced_project
):
    from flows.pipeline import pipeline

    by_flow = make_project(tmp_path / "by-flow", TINY_PARAMS)
    for key, value in environment(by_flow).items():
        monkeypatch.setenv(key, value)

    result = pipeline(project=str(by_flow))
    assert [row["stage"] for row in result["stages"]] == list(STAGES)
    assert all(row["ran"] for row in result["stages"])
    flow_lock = lock_stages((by_flow / "dvc.lock").read_text())
    dvc_lock = lock_stages(reproduced_project.lock)  # the same params through `dvc repro`
    assert set(flow_lock) == set(dvc_lock)
    for stage in STAGES:
        assert hashes(flow_lock[stage]) == hashes(dvc_lock[stage]), stage
    samples = {o["path"]: o["md5"] for o in flow_lock["sample"]["outs"]}
    assert (
        samples["data/samples"] == {o["path"]: o["md5"] for o in dvc_lock["sample"]["outs"]}["data/samples"]
    )  # same images: the whole chain computed the same thing
    assert "generation.fid_fmnist" in result["metrics"]

    status = run(["dvc", "status", "--json"], by_flow, environment(by_flow))
    assert json.loads(status) == {}
    again = pipeline(project=str(by_flow))
    assert not any(row["ran"] for row in again["stages"])
    assert again["metrics"] == result["metrics"]  # evaluate reproduced (as current): its metrics stand
    subset = pipeline(project=str(by_flow), stages=["sample"])
    assert subset["metrics"] == {}  # without evaluate the metric files may be an earlier run's

    # A sweep over two points that change only the sampler: DVC reruns the params check, sample and
    # evaluate only; each point becomes a DVC experiment, params.yaml is restored, one table holds both rows.
    from flows.sweep import sweep

    before = (by_flow / "params.yaml").read_text()
    rows = sweep(
        points=[
            {"name": "seed-1", "overrides": {"sample": {"seed": 1}}},
            {"name": "seed-2", "overrides": {"sample": {"seed": 2}}},
        ],
        project=str(by_flow),
        table="reports/sweep.csv",
    )
    assert [row["name"] for row in rows] == ["seed-1", "seed-2"]
    assert [row["params.sample.seed"] for row in rows] == [1, 2]
    assert [row["stages_ran"] for row in rows] == ["check_params sample evaluate"] * 2
    assert all(isinstance(row["generation.fid_fmnist"], float) for row in rows)
    assert rows[0]["generation.fid_fmnist"] != rows[1]["generation.fid_fmnist"]
    assert rows[0]["tokenizer.psnr"] == rows[1]["tokenizer.psnr"]  # same tokenizer, not retrained
    assert (by_flow / "params.yaml").read_text() == before
    status = run(["dvc", "status", "--json"], by_flow, environment(by_flow))
    assert json.loads(status) == {}  # dvc.lock and the outputs are the baseline's again
    table = (by_flow / "reports" / "sweep.csv").read_text().splitlines()
    assert len(table) == 3 and "generation.fid_fmnist" in table[0]
    experiments = run(["dvc", "exp", "list", "--name-only"], by_flow, environment(by_flow))
    assert {"seed-1", "seed-2"} <= set(experiments.split()), experiments


@pytest.mark.slow
def test_a_scaled_down_study_runs_both_parts_with_every_label_and_writes_its_report(
    tmp_path, harness, monkeypatch
):
    from flows.study import LABELS, codebook_study, sweep_table

    params = merged(TINY_PARAMS, {"tokenizer": {"total_steps": 4}, "run": {"tokenizer": {"val_every": 2}}})
    root = make_project(tmp_path / "study", params)
    for key, value in environment(root).items():
        monkeypatch.setenv(key, value)
    out = "reports/study/codebook_size"
    rows = codebook_study(sizes=[256, 1024], part="tokenizer", project=str(root), out=out)
    assert [(row["quantizer"], row["codebook size"]) for row in rows] == [
        (label, size) for label in LABELS for size in (256, 1024)
    ]
    assert all(0 < row["usage %"] <= 100 and row["rfid_fmnist"] is not None for row in rows)
    assert all(row["sampling fid_fmnist"] is None for row in rows)  # the prior part has not run
    # every point's validation curves are kept (two validations: the last change is known)
    assert all(row["Δusage % last val"] is not None for row in rows), rows
    sweep = (root / "reports/study/codebook_size-tokenizer-sweep.csv").read_text()
    assert "params.tokenizer.quantizer_options" in sweep.splitlines()[0]

    # residual FSQ's two stages reach the prior as a token grid twice as tall
    rows = codebook_study(sizes=[256], labels=["rfsq"], part="prior", project=str(root), out=out)
    assert (sweep_table(root / out, "prior", ("rfsq",))).is_file()
    import mlflow

    client = mlflow.MlflowClient(environment(root)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("imtok").experiment_id
    trained = client.search_runs([experiment], "tags.`imtok.stage` = 'train_tokenizer'")
    assert len(trained) == 2 * len(LABELS)  # one per tokenizer point: the prior part trained none again
    sampled = [row for row in rows if row["sampling fid_fmnist"] is not None]
    assert [(row["quantizer"], row["codebook size"]) for row in sampled] == [("rfsq", 256)]
    assert len(rows) == 2 * len(LABELS)  # the tokenizer part's rows stay in the report
    for name in (
        "codebook_size.csv",
        "codebook_size.md",
        "codebook_size.png",
        "codebook_size-convergence.png",
    ):
        assert (root / "reports" / "study" / name).stat().st_size > 0, name
