"""The flows' pure parts: the DAG read from dvc.yaml, overrides, sweep points and the study table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.dag import Stage, check_order, metric_writers, read_stages, select, uncached_outputs, upstream
from flows.study import markdown, points, study_rows
from flows.sweep import check_points, write_table
from imtok.overrides import validated, write_overrides

REPO = Path(__file__).resolve().parents[1]


def test_the_dag_follows_dvc_yaml_and_places_model_stages_on_the_gpu_pool():
    stages = read_stages(REPO)
    names = [stage.name for stage in stages]
    assert names[:2] == ["check_params", "prepare"] and names[-1] == "evaluate"
    pools = {stage.name: stage.pool for stage in stages}
    assert pools["check_params"] == pools["prepare"] == "cpu"
    assert all(pools[name] == "gpu" for name in names if name not in ("check_params", "prepare"))
    assert upstream(stages, "check_params") == []
    assert upstream(stages, "prepare") == ["check_params"]  # so every stage is downstream of it
    assert upstream(stages, "extract_tokens") == ["prepare", "train_tokenizer"]
    # The tokenizer is evaluated without a prior (the study's tokenizer sweep stops there).
    assert upstream(stages, "evaluate_tokenizer") == ["prepare", "train_tokenizer", "train_classifier"]
    assert upstream(stages, "evaluate") == ["prepare", "train_prior", "sample", "train_classifier"]
    by_name = {stage.name: stage for stage in stages}
    assert "metrics/tokenizer.json" not in by_name["evaluate_tokenizer"].outs  # cache: false is not pushed


def test_a_stage_declared_before_its_input_is_an_error_naming_both():
    late = [Stage("b", ("x",), ("y",), ()), Stage("a", (), ("x",), ())]
    with pytest.raises(ValueError, match=r"'b' depends on \['a'\]"):
        check_order(late)


def test_selecting_unknown_stages_names_them():
    stages = read_stages(REPO)
    assert [s.name for s in select(stages, ["evaluate", "prepare"])] == ["prepare", "evaluate"]
    with pytest.raises(KeyError, match="trian_prior"):
        select(stages, ["trian_prior"])


def test_overrides_are_written_into_params_yaml_keeping_its_comments(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    overrides = {"prior": {"depth": 5}, "tokenizer": {"levels": [8, 5, 5, 5], "codebook_size": None}}
    write_overrides(path, overrides)
    text = path.read_text()
    assert "# transformer blocks" in text
    values = yaml.safe_load(text)
    assert values["prior"]["depth"] == 5 and values["tokenizer"]["levels"] == [8, 5, 5, 5]
    assert (
        values["prior"]["hidden_dim"]
        == yaml.safe_load((REPO / "params.yaml").read_text())["prior"]["hidden_dim"]
    )


def test_a_bad_override_fails_before_anything_is_written(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_text()
    with pytest.raises(ValueError, match="quantizer"):
        write_overrides(path, {"tokenizer": {"quantizer": "pq"}})
    with pytest.raises(ValueError, match="no_such_key"):
        validated(path, {"prior": {"no_such_key": 1}})
    assert path.read_text() == before


def test_sweep_points_need_unique_names_and_valid_overrides():
    params = REPO / "params.yaml"
    check_points(params, [{"name": "a", "overrides": {"sample": {"seed": 1}}}])
    with pytest.raises(ValueError, match="unique 'name'"):
        check_points(params, [{"name": "a"}, {"name": "a"}])
    check_points(params, [{"name": "lr-3e-4"}, {"name": "v1.2_b"}])
    for bad in ("lr 0.003", "a/b", "a..b", ".hidden", "-x", "x.lock", "x.", 7):
        with pytest.raises(ValueError, match="not usable as a DVC experiment name"):
            check_points(params, [{"name": "fine"}, {"name": bad}])
    with pytest.raises(ValueError, match=r"sweep point 'bad'.*levels"):
        check_points(params, [{"name": "bad", "overrides": {"tokenizer": {"levels": [1, 5]}}}])
    with pytest.raises(ValueError, match="no points"):
        check_points(params, [])
    with pytest.raises(ValueError, match="list of"):
        check_points(params, ["fsq-256"])
    with pytest.raises(ValueError, match="study profile"):
        points(profile=["tokenizer"])


def test_study_points_cover_every_label_and_size_with_valid_params():
    profile = {"tokenizer": {"total_steps": 10, "warmup_steps": 2}}
    study = points((256, 1024), ("fsq", "vq-plain", "vq"), profile)
    assert [p["name"] for p in study] == [
        "fsq-256",
        "fsq-1024",
        "vq-plain-256",
        "vq-plain-1024",
        "vq-256",
        "vq-1024",
    ]
    configs = {}
    for point in study:
        params = validated(REPO / "params.yaml", point["overrides"])
        assert params.tokenizer.total_steps == 10
        configs[point["name"]] = params.tokenizer_config(1, 32)
    fsq = configs["fsq-1024"]
    assert fsq.quantizer == "fsq" and fsq.levels is None and fsq.codebook_size == 1024
    # plain VQ: random init, nothing re-seeded; ours: k-means seeding and restarts (the defaults)
    plain, ours = build_quantizer_of(configs["vq-plain-1024"]), build_quantizer_of(configs["vq-1024"])
    assert bool(plain.initialized) and plain.restart_after_steps is None and plain.ema
    assert not bool(ours.initialized) and ours.restart_after_steps is not None and ours.ema
    with pytest.raises(ValueError, match=r"unknown label.*vq-plain"):
        points((256,), ("vq_plain",))


def build_quantizer_of(config):
    from imtok.models.autoencoder import build_quantizer

    return build_quantizer(
        config.quantizer,
        levels=config.levels,
        codebook_size=config.codebook_size,
        dim=config.latent_dim,
        **config.quantizer_options,
    )


def test_the_study_table_joins_the_two_parts_by_point_and_reads_the_domain_fid(tmp_path):
    tokenizer_rows = [
        {
            "name": "vq-plain-256",
            "tokenizer.codebook_usage_pct": 12.5,
            "tokenizer.perplexity": 20.0,
            "tokenizer.psnr": 19.0,
            "tokenizer.ssim": 0.7,
            "tokenizer.rfid_fmnist": 40.0,
        },
        {
            "name": "fsq-256",
            "tokenizer.codebook_usage_pct": 100.0,
            "tokenizer.perplexity": 200.5,
            "tokenizer.psnr": 22.123,
            "tokenizer.ssim": 0.8,
            "tokenizer.rfid_fmnist": 12.0,
        },
    ]
    prior_rows = [
        {
            "name": "fsq-256",
            "tokenizer.psnr": 99.0,  # the same tokenizer: the tokenizer sweep's figures stand
            "generation.fid_fmnist": 50.25,
            "generation.precision_fmnist": 0.5,
            "generation.recall_fmnist": 0.25,
        }
    ]
    rows = study_rows(tokenizer_rows, prior_rows)
    assert [(row["quantizer"], row["codebook size"]) for row in rows] == [("fsq", 256), ("vq-plain", 256)]
    assert rows[0]["sampling fid_fmnist"] == 50.25 and rows[0]["usage %"] == 100.0
    assert rows[0]["PSNR"] == 22.123 and rows[0]["recall"] == 0.25
    assert rows[1]["sampling fid_fmnist"] is None and rows[1]["rfid_fmnist"] == 40.0
    text = markdown(rows)
    assert "| fsq | 256 | 100 | 200 | 22.1 | 0.8 | 12 | 50.2 | 0.5 | 0.25 |" in text
    assert "| vq-plain | 256 | 12.5 | 20 | 19 | 0.7 | 40 |  |  |  |" in text
    write_table(rows, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("quantizer,codebook size")


def test_the_convergence_columns_are_the_change_between_the_last_two_validations(tmp_path):
    from flows.study import with_convergence

    (tmp_path / "fsq-256.csv").write_text(
        "step,train_loss,val_psnr,val_codebook_usage_pct\n10,0.5,,\n100,0.4,20.0,80.0\n200,0.3,21.5,90.5\n"
    )
    rows = with_convergence(
        [{"quantizer": "fsq", "codebook size": 256}, {"quantizer": "vq", "codebook size": 256}], tmp_path
    )
    assert rows[0]["Δusage % last val"] == pytest.approx(10.5) and rows[0]["ΔPSNR last val"] == pytest.approx(
        1.5
    )
    assert rows[1]["Δusage % last val"] is None  # no curves kept for it


def test_every_deployment_in_prefect_yaml_points_at_a_flow_that_imports():
    import importlib

    from prefect import Flow

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {deployment["name"] for deployment in spec["deployments"]}
    assert {"nightly", "evaluate", "sweep", "codebook-study"} <= names
    for deployment in spec["deployments"]:
        path, attribute = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, attribute), Flow), deployment["entrypoint"]
        assert deployment["work_pool"]["name"] in ("gpu", "cpu")
        for stage in (deployment.get("parameters") or {}).get("stages", []):
            assert stage in {s.name for s in read_stages(REPO)}, stage
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly"]
    assert nightly["schedules"][0]["cron"] == "0 3 * * *"


def test_only_transfer_failures_are_retried(tmp_path):
    import subprocess

    from prefect.states import Failed

    from flows.dvc import DvcCommandError, DvcTransferError, dvc
    from flows.pipeline import _only_transfer_errors

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    with pytest.raises(DvcTransferError, match="dvc pull"):
        dvc(tmp_path, "pull", "--remote", "absent", "no_such_stage")
    with pytest.raises(DvcCommandError, match="dvc repro") as failed:
        dvc(tmp_path, "repro", "no_such_stage")
    assert not isinstance(failed.value, DvcTransferError)
    assert _only_transfer_errors(None, None, Failed(data=DvcTransferError("remote down")))
    assert not _only_transfer_errors(None, None, Failed(data=DvcCommandError("stage failed")))
    assert not _only_transfer_errors(None, None, Failed(data=ValueError("bad params")))


def test_a_fresh_checkout_fetches_the_outputs_another_host_pushed_instead_of_running_the_stage(tmp_path):
    import subprocess

    from flows.dvc import dvc
    from flows.pipeline import only_outputs_missing, pull_own_outputs

    def git(*arguments: str, cwd: Path) -> None:
        subprocess.run(["git", *arguments], cwd=cwd, check=True, capture_output=True)

    first = tmp_path / "first"
    first.mkdir()
    git("init", "-q", cwd=first)
    git("config", "user.email", "ci@example.org", cwd=first)
    git("config", "user.name", "ci", cwd=first)
    dvc(first, "init", "-q")
    dvc(first, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    (first / "params.yaml").write_text("make:\n  value: 1\n")
    script = "import yaml; open('out.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['make']))"
    (first / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "make": {"cmd": f'python -c "{script}"', "params": ["make.value"], "outs": ["out.txt"]}
                }
            }
        )
    )
    dvc(first, "repro", "make")
    dvc(first, "push", "make")
    git("add", "-A", cwd=first)
    git("commit", "-qm", "made", cwd=first)

    second = tmp_path / "second"
    git("clone", "-q", str(first), str(second), cwd=tmp_path)
    assert only_outputs_missing(second, "make", set())  # unchanged, only its output absent
    pull_own_outputs.fn(second, "make", None)
    assert (second / "out.txt").read_text() == (first / "out.txt").read_text()
    assert "didn't change" in dvc(second, "repro", "--single-item", "make")
    assert not only_outputs_missing(second, "make", set())  # nothing missing now

    third = tmp_path / "third"
    git("clone", "-q", str(first), str(third), cwd=tmp_path)
    (third / "params.yaml").write_text("make:\n  value: 2\n")
    assert not only_outputs_missing(third, "make", set())  # changed params: the stage must run
    (third / "params.yaml").write_text("make:\n  value: 1\n")
    assert only_outputs_missing(third, "make", set())
    # A cache: false output (a report) that git does not hold cannot come from the remote.
    stage = yaml.safe_load((third / "dvc.yaml").read_text())
    stage["stages"]["make"]["metrics"] = [{"report.json": {"cache": False}}]
    (third / "dvc.yaml").write_text(yaml.safe_dump(stage))
    lock = yaml.safe_load((third / "dvc.lock").read_text())
    lock["stages"]["make"]["outs"].append({"path": "report.json", "hash": "md5", "md5": "0" * 32, "size": 2})
    (third / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert not only_outputs_missing(third, "make", set(uncached_outputs(read_stages(third))))

    # A strict pull of files the remote never had is not a network failure: not retried.
    from flows.dvc import DvcCommandError, DvcTransferError

    (first / "params.yaml").write_text("make:\n  value: 3\n")
    dvc(first, "repro", "make")  # made but never pushed
    git("commit", "-qam", "remade", cwd=first)
    fourth = tmp_path / "fourth"
    git("clone", "-q", str(first), str(fourth), cwd=tmp_path)
    with pytest.raises(DvcCommandError, match=r"the remote lacks files dvc\.lock names") as missing:
        dvc(fourth, "pull", "make")
    assert not isinstance(missing.value, DvcTransferError)
    pull_own_outputs.fn(fourth, "make", None)  # best effort: leaves the stage to make them


def _imtok_imports(script: Path) -> set[Path]:
    """The imtok module files ``script`` imports, directly or through other imtok modules (at any
    level of their code: imports inside functions count)."""
    import ast

    def module_file(name: str) -> Path | None:
        base = REPO / name.replace(".", "/")
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        return base / "__init__.py" if (base / "__init__.py").is_file() and name != "imtok" else None

    def imports(path: Path) -> set[Path]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            found |= {module_file(name) for name in names if name.startswith("imtok.")} - {None}
        return found

    seen: set[Path] = set()
    todo = imports(script)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo |= imports(path) - seen
    return seen


def test_every_stage_lists_the_imtok_modules_its_script_imports_among_its_dvc_deps():
    # Otherwise a change to, say, how images are read reruns prepare (byte-identical shards) and
    # DVC skips the stages whose results it changes.
    # imtok/layout.py is dvc.yaml's own vars file: a path changed there changes the stage definitions,
    # which DVC compares itself.
    stages = {stage.name: stage for stage in read_stages(REPO)}
    commands = {
        name: body["cmd"] for name, body in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()
    }
    for name, stage in stages.items():
        script = REPO / (commands[name].split(" -m ")[1].split()[0].replace(".", "/") + ".py")
        deps = [REPO / dep for dep in stage.deps] + [REPO / "imtok" / "layout.py"]
        uncovered = {
            str(path.relative_to(REPO))
            for path in _imtok_imports(script)
            if not any(path == dep or dep in path.parents for dep in deps)
        }
        assert not uncovered, f"dvc.yaml stage {name}: add {sorted(uncovered)} to its deps"


def test_a_saved_experiment_carries_the_uncached_metrics_so_applying_it_brings_them_back(tmp_path):
    import subprocess

    from flows.dvc import dvc, save_experiment

    assert {"metrics/tokenizer.json", "metrics/generation.json", "reports/train_tokenizer.json"} <= set(
        uncached_outputs(read_stages(REPO))
    )
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for key, value in (("user.email", "ci@example.org"), ("user.name", "ci")):
        subprocess.run(["git", "config", key, value], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text("make:\n  value: 1\n")
    script = (
        "import json, os, yaml; os.makedirs('metrics', exist_ok=True); "
        "value = yaml.safe_load(open('params.yaml'))['make']['value']; "
        "json.dump({'score': value}, open('metrics/m.json', 'w'))"
    )
    metrics = [{"metrics/m.json": {"cache": False}}]
    stage = {"cmd": f'python -c "{script}"', "params": ["make.value"], "metrics": metrics}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "stage"], cwd=tmp_path, check=True)
    for value in (1, 2):
        (tmp_path / "params.yaml").write_text(f"make:\n  value: {value}\n")
        dvc(tmp_path, "repro", "make")
        save_experiment(tmp_path, f"value-{value}")
    dvc(tmp_path, "exp", "apply", "value-1")
    assert yaml.safe_load((tmp_path / "metrics" / "m.json").read_text()) == {"score": 1}


def test_metrics_come_from_the_two_evaluation_stages():
    assert metric_writers(read_stages(REPO)) == {"evaluate_tokenizer", "evaluate"}


def test_after_a_sweep_the_lock_and_every_output_are_the_baselines_again(tmp_path):
    import subprocess

    from flows.dvc import dvc
    from flows.sweep import restore_outputs, uncached_snapshot

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    script = (
        "import json, yaml; value = yaml.safe_load(open('params.yaml'))['make']['value']; "
        "open('out.txt', 'w').write(str(value)); json.dump({'value': value}, open('report.json', 'w')); "
        "json.dump({'value': value}, open('extra.json', 'w'))"
    )
    stage = {"cmd": f'python -c "{script}"', "params": ["make.value"], "outs": ["out.txt"]}
    stage["metrics"] = [{"report.json": {"cache": False}}, {"extra.json": {"cache": False}}]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    (tmp_path / "params.yaml").write_text("make:\n  value: 1\n")
    dvc(tmp_path, "repro", "make")
    (tmp_path / "extra.json").unlink()  # e.g. a report the checkout never held
    lock, found = (tmp_path / "dvc.lock").read_text(), uncached_snapshot(tmp_path)
    assert found["extra.json"] is None and found["report.json"] is not None
    (tmp_path / "params.yaml").write_text("make:\n  value: 2\n")  # a sweep point, then params put back
    dvc(tmp_path, "repro", "make")
    (tmp_path / "params.yaml").write_text("make:\n  value: 1\n")
    restore_outputs(tmp_path, tmp_path / "dvc.lock", lock, found)
    assert (tmp_path / "dvc.lock").read_text() == lock
    assert (tmp_path / "out.txt").read_text() == "1"  # checked out of the cache
    assert yaml.safe_load((tmp_path / "report.json").read_text()) == {"value": 1}
    assert not (tmp_path / "extra.json").exists()  # not the last point's, passing for the baseline's


def test_read_stages_resolves_paths_from_the_vars_as_dvc_does(tmp_path):
    layout = 'SHARDS = "data/shards"\nWHERE = Path("x")  # not a literal: DVC skips it\n'
    (tmp_path / "layout.py").write_text(layout)
    stages = {
        "make": {
            "cmd": "true",
            "deps": ["${SHARDS}/train"],
            "outs": ["${OUT}", {"${REPORTS}/make.json": {"cache": False}}],
        }
    }
    document = {"vars": ["layout.py", {"OUT": "models/made", "REPORTS": "reports"}], "stages": stages}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(document))
    (stage,) = read_stages(tmp_path)
    assert stage.deps == ("data/shards/train",)
    assert stage.outs == ("models/made",) and stage.uncached == ("reports/make.json",)
    # the real dvc.yaml resolves to the paths DVC itself lists
    listed = {stage.name: stage.outs + stage.uncached for stage in read_stages(REPO)}
    assert listed["prepare"] == ("data/shards/train", "data/shards/val", "reports/prepare.json")
    stages["make"]["deps"] = ["${NOWHERE}/train"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match=r"stage make: '\$\{NOWHERE\}/train' names no variable"):
        read_stages(tmp_path)
