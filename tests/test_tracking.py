"""MLflow helpers against a real sqlite store: champion promotion, params flattening, URI errors."""

from __future__ import annotations

import tempfile

import pytest

from imtok import registry, tracking


def new_version(client, name: str, tmp_path) -> str:
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    source = (
        tmp_path / name / str(len(list((tmp_path / name).glob("*"))) if (tmp_path / name).exists() else 0)
    )
    source.mkdir(parents=True)
    return str(client.create_model_version(name, source=str(source)).version)


def test_a_better_candidate_takes_champion_and_a_worse_one_does_not(mlflow_store, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    first, second, third = (new_version(client, "imtok-prior", tmp_path) for _ in range(3))
    decision = registry.promote_if_better("imtok-prior", first, "fid_fmnist", 40.0, higher_is_better=False)
    assert decision.promoted and decision.reason.startswith("first champion")
    assert registry.promote_if_better(
        "imtok-prior", second, "fid_fmnist", 30.0, higher_is_better=False
    ).promoted
    worse = registry.promote_if_better("imtok-prior", third, "fid_fmnist", 35.0, higher_is_better=False)
    assert not worse.promoted and "does not beat version 2's 30" in worse.reason
    assert str(client.get_model_version_by_alias("imtok-prior", "champion").version) == second
    assert client.get_model_version("imtok-prior", third).tags["imtok.promotion"] == worse.reason
    assert client.get_model_version("imtok-prior", third).tags["eval.fid_fmnist"] == "35.0"


def test_higher_is_better_metrics_and_non_finite_values(mlflow_store, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    first, second, third = (new_version(client, "imtok-tokenizer", tmp_path) for _ in range(3))
    registry.promote_if_better("imtok-tokenizer", first, "psnr", 20.0, higher_is_better=True)
    assert registry.promote_if_better("imtok-tokenizer", second, "psnr", 21.0, higher_is_better=True).promoted
    assert not registry.promote_if_better(
        "imtok-tokenizer", third, "psnr", float("nan"), higher_is_better=True
    ).promoted
    assert str(client.get_model_version_by_alias("imtok-tokenizer", "champion").version) == second


def test_flatten_names_nested_keys_and_caps_long_values():
    flat = tracking.flatten({"a": {"b": 1, "c": (1, 2)}, "d": "x" * 7000, "e": {}})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]" and flat["e"] == "{}"
    assert len(flat["d"]) == tracking.MAX_PARAM_LENGTH and flat["d"].endswith("...")


def test_model_uris_that_do_not_resolve_are_named_and_leave_nothing(mlflow_store, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with (
        pytest.raises(ValueError, match="models:/nothing@here: cannot fetch"),
        registry.fetched_model_file("models:/nothing@here", "tokenizer.pt"),
    ):
        pass
    assert list(scratch.iterdir()) == []


def test_local_model_files_are_passed_through_untouched(tmp_path):
    (tmp_path / "tokenizer.pt").write_bytes(b"weights")
    with registry.fetched_model_file(tmp_path, "tokenizer.pt") as path:
        assert path == tmp_path / "tokenizer.pt"
    with registry.fetched_model_file(tmp_path / "tokenizer.pt", "ignored.pt") as path:
        assert path == tmp_path / "tokenizer.pt"
    assert (tmp_path / "tokenizer.pt").read_bytes() == b"weights"


def test_a_stage_resumes_its_run_unless_the_run_is_gone_or_deleted(mlflow_store, caplog):
    import mlflow

    with tracking.stage_run("probe", {"a": 1}, system_metrics=False) as run:
        first = run.info.run_id
    with tracking.stage_run("probe", {"a": 1}, resume_run_id=first, system_metrics=False) as run:
        assert run.info.run_id == first
    mlflow.MlflowClient().delete_run(first)  # a failed run cleaned up in the UI
    with tracking.stage_run("probe", {"a": 1}, resume_run_id=first, system_metrics=False) as run:
        second = run.info.run_id
    assert second != first
    assert f"MLflow run {first} was deleted" in caplog.text
    assert mlflow.MlflowClient().get_run(second).info.status == "FINISHED"
    with tracking.stage_run("probe", {"a": 1}, resume_run_id="0" * 32, system_metrics=False) as run:
        assert run.info.run_id not in (first, second)


def test_every_metric_is_tagged_at_full_precision_so_a_later_switch_of_metric_compares_exactly(
    mlflow_store, tmp_path
):
    import mlflow

    from imtok.evaluation import tag_and_promote

    client = mlflow.MlflowClient()
    first, second = (new_version(client, "imtok-tokenizer", tmp_path) for _ in range(2))
    key = "evaluate.tokenizer_metric"
    tag_and_promote(client, "imtok-tokenizer", first, "psnr", {"psnr": 30.0, "ssim": 0.91234549}, key)
    # Worse in the seventh digit, which a 6-digit tag of the champion's ssim would hide.
    decision = tag_and_promote(
        client, "imtok-tokenizer", second, "ssim", {"psnr": 29.0, "ssim": 0.9123454}, key
    )
    assert not decision["promoted"], decision["reason"]
    assert str(client.get_model_version_by_alias("imtok-tokenizer", "champion").version) == first
    assert float(client.get_model_version("imtok-tokenizer", first).tags["eval.ssim"]) == 0.91234549


@pytest.mark.parametrize(
    ("holder", "held", "same", "higher", "value", "promoted", "says"),
    [
        (None, None, False, True, 20.0, True, "first champion: psnr=20"),
        ("3", 20.0, True, True, 20.0, True, "already champion"),
        ("3", None, False, True, 20.0, True, "replaces version 3, which has no psnr to compare"),
        ("3", 20.0, False, True, 21.0, True, "psnr=21 beats version 3's 20 (higher is better)"),
        ("3", 20.0, False, True, 20.0, False, "psnr=20 does not beat version 3's 20"),
        ("3", 40.0, False, False, 35.0, True, "psnr=35 beats version 3's 40 (lower is better)"),
        ("3", 40.0, False, False, 45.0, False, "does not beat"),
    ],
)
def test_the_promotion_rule_without_mlflow(holder, held, same, higher, value, promoted, says):
    decided, reason = registry.promotion_decision(
        "psnr", value, holder, held, same_version=same, higher_is_better=higher
    )
    assert decided is promoted and says in reason
