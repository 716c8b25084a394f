"""The GPU profile is valid params, and becomes DVC's -S arguments."""

from pathlib import Path

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


def test_every_point_of_the_cpu_study_profile_is_valid():
    from flows.study import LABELS, SIZES, points
    from imtok.overrides import validated

    profile = yaml.safe_load((REPO / "profiles" / "study-cpu.yaml").read_text())
    study = points(profile=profile)
    assert len(study) == len(LABELS) * len(SIZES) == 32  # eight labels x four sizes
    for point in study:
        params = validated(REPO / "params.yaml", point["overrides"])
        assert params.tokenizer.val_batches == profile["tokenizer"]["val_batches"], point["name"]
        assert params.tokenizer.total_steps % params.tokenizer.val_every == 0  # the last val is the end
