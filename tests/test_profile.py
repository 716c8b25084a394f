"""The GPU profile is valid params, and becomes DVC's -S arguments."""

from pathlib import Path

import pytest
import yaml

from imtok.overrides import merged, set_param_arguments
from imtok.params import Params

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_profile_is_valid_on_top_of_params_yaml():
    profile = yaml.safe_load((REPO / "profiles" / "gpu.yaml").read_text())
    params = Params.from_dict(merged(yaml.safe_load((REPO / "params.yaml").read_text()), profile))
    assert params.tokenizer.base_channels == profile["tokenizer"]["base_channels"]
    assert params.sample.per_class == profile["sample"]["per_class"]


def test_overrides_become_set_param_arguments_in_yaml_flow_syntax():
    arguments = set_param_arguments(
        {"tokenizer": {"mid_attention": True, "levels": [8, 5], "vgg_weights": None}}
    )
    assert arguments == [
        "-S",
        "tokenizer.mid_attention=true",
        "-S",
        "tokenizer.levels=[8,5]",
        "-S",
        "tokenizer.vgg_weights=null",
    ]


def test_a_nested_override_sets_its_leaf_and_keeps_the_keys_beside_it(tmp_path):
    from imtok.overrides import write_overrides

    base = {"run": {"tokenizer": {"device": "cpu", "log_every": 5}}, "tokenizer": {"lr": 0.1}}
    override = {"run": {"tokenizer": {"log_every": 10}}}
    expected = {"run": {"tokenizer": {"device": "cpu", "log_every": 10}}, "tokenizer": {"lr": 0.1}}
    assert merged(base, override) == expected
    assert base["run"]["tokenizer"]["log_every"] == 5  # the params given are not changed
    assert set_param_arguments(override) == ["-S", "run.tokenizer.log_every=10"]
    path = tmp_path / "params.yaml"
    path.write_text("run:\n  tokenizer:\n    device: cpu  # where\n    log_every: 5\n")
    params = write_overrides(path, override)
    assert params.run.tokenizer.log_every == 10 and params.run.tokenizer.device == "cpu"
    assert path.read_text() == "run:\n  tokenizer:\n    device: cpu  # where\n    log_every: 10\n"


def test_params_that_are_no_mapping_are_refused_by_name_before_an_override_is_set(tmp_path):
    from imtok.overrides import validated

    path = tmp_path / "params.yaml"
    path.write_text("- tokenizer\n- prior\n")
    with pytest.raises(ValueError, match=r"^params: expected a mapping of sections, got list$"):
        validated(path, {"run": {"tokenizer": {"log_every": 10}}})


def test_every_point_of_the_cpu_study_profile_is_valid():
    from flows.study import LABELS, SIZES, points
    from imtok.overrides import validated

    profile = yaml.safe_load((REPO / "profiles" / "study-cpu.yaml").read_text())
    study = points(profile=profile)
    assert len(study) == len(LABELS) * len(SIZES) == 32  # eight labels x four sizes
    for point in study:
        params = validated(REPO / "params.yaml", point["overrides"])
        run = params.run.tokenizer
        assert run.val_batches == profile["run"]["tokenizer"]["val_batches"], point["name"]
        assert params.tokenizer.total_steps % run.val_every == 0  # the last val is the end
