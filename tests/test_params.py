"""params.yaml models: defaults, the repository's own file, and errors that name the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from imtok.params import Params, PrepareParams, RunParams, TokenizerParams, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_load_and_match_the_documented_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.prepare.source == "fashion_mnist"
    assert params.prepare.image_size == 28 and params.prepare.channels == 1
    assert params.prepare.image_size % params.tokenizer.downsample == 0


def test_no_stage_depends_on_a_run_setting_but_its_device_and_no_section_repeats_one():
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        listed = [entry for entry in stage.get("params", []) if isinstance(entry, str)]
        run = [entry for entry in listed if entry.split(".")[0] == "run"]
        assert all(entry.endswith(".device") for entry in run), name
    defaults = Params()
    for section, kind in RunParams.stages().items():
        own = {field.name for field in dataclasses.fields(getattr(defaults, section))}
        assert not own & {field.name for field in dataclasses.fields(kind)}, section


def test_a_key_that_moved_to_the_run_section_says_where_it_went():
    with pytest.raises(ValueError, match=r"^prior\.dist_timeout_s: moved to run\.dist_timeout_s"):
        Params.from_dict({"prior": {"dist_timeout_s": 60}})
    assert Params.from_dict({"run": {"dist_timeout_s": 60}}).run.dist_timeout_s == 60.0
    with pytest.raises(ValueError, match=r"^run\.dist_timeout_s: expected float \| null, got '1h' \(str\)$"):
        Params.from_dict({"run": {"dist_timeout_s": "1h"}})
    with pytest.raises(
        ValueError, match=r"^tokenizer\.log_every: moved to run\.tokenizer\.log_every; set it"
    ):
        Params.from_dict({"tokenizer": {"log_every": 10}})
    with pytest.raises(ValueError, match=r"^extract\.device: moved to run\.extract\.device"):
        Params.from_dict({"extract": {"device": "cpu"}})


def test_the_run_section_checks_its_nested_keys_and_names_them():
    run = Params.from_dict({"run": {"tokenizer": {"log_every": 3}, "prior": {"device": "cpu"}}}).run
    assert run.tokenizer.log_every == 3 and run.tokenizer.val_every == 250  # the rest: defaults
    assert run.prior.device == "cpu" and run.prior.log_every == 50
    with pytest.raises(ValueError, match=r"^run\.tokenizer\.log_every: must be >= 1, got 0$"):
        Params.from_dict({"run": {"tokenizer": {"log_every": 0}}})
    with pytest.raises(
        ValueError, match=r"^run\.prior\.grid_images: unknown key; the keys of `run\.prior` are"
    ):
        Params.from_dict({"run": {"prior": {"grid_images": 8}}})
    with pytest.raises(
        ValueError, match=r"^run\.sampel: unknown key; the keys of `run` are dist_timeout_s, "
    ):
        Params.from_dict({"run": {"sampel": {"device": "cpu"}}})
    with pytest.raises(ValueError, match=r"^run\.extract: expected a mapping of keys to values, got int$"):
        Params.from_dict({"run": {"extract": 4}})


def test_ints_are_accepted_for_floats_and_missing_keys_take_defaults():
    params = PrepareParams.from_dict({"val_fraction": 1 / 4, "limit": 10})
    assert params.val_fraction == 0.25 and params.limit == 10 and params.maxcount == 10000
    assert TokenizerParams.from_dict(None).downsample == 4


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"prepare": {"source": "imagenet"}}, "prepare.source"),
        ({"prepare": {"image_size": 30}}, "prepare.image_size"),
        (
            {"prepare": {"image_size": 32}, "tokenizer": {"downsample": 64, "channel_multipliers": [1] * 7}},
            "prepare.image_size",
        ),
        ({"tokenizer": {"downsample": 8}}, "tokenizer.channel_multipliers"),
        ({"tokenizer": {"quantizer": "magvit"}}, "tokenizer.quantizer"),
        ({"tokenizer": {"levels": [8, 5, 5, 5], "codebook_size": 1024}}, "tokenizer.levels"),
        ({"tokenizer": {"levels": [8, 1], "codebook_size": None}}, "tokenizer.levels[1]"),
        ({"tokenizer": {"quantizer": "vq", "levels": [8, 5]}}, "tokenizer.levels"),
        ({"tokenizer": {"quantizer_options": {"bogus": 1}}}, "tokenizer.quantizer_options.bogus"),
        ({"tokenizer": {"quantizer_options": {"fsq": {"bogus": 1}}}}, "tokenizer.quantizer_options.fsq"),
        ({"tokenizer": {"quantizer_options": {"vq": [1]}}}, "tokenizer.quantizer_options.vq"),
        ({"tokenizer": {"quantizer_options": {"vq": False}}}, "tokenizer.quantizer_options.vq"),
        ({"tokenizer": {"quantizer_options": {"vq": 0}}}, "tokenizer.quantizer_options.vq"),
        (
            {"tokenizer": {"quantizer": "vq", "quantizer_options": {"vq": {"ema": "off"}}}},
            "tokenizer.quantizer_options.vq.ema",
        ),
        (
            {"tokenizer": {"quantizer_options": {"fsq": {"fused": "yes"}}}},
            "tokenizer.quantizer_options.fsq.fused",
        ),
        (
            {"tokenizer": {"quantizer": "vq", "quantizer_options": {"vq": {"beta": "0.25"}}}},
            "tokenizer.quantizer_options.vq.beta",
        ),
        # another quantizer's options are checked too: a typo there cannot wait for the day it is used
        (
            {"tokenizer": {"quantizer_options": {"regvq": {"mask_ratio": "x"}}}},
            "tokenizer.quantizer_options.regvq.mask_ratio",
        ),
        ({"tokenizer": {"betas": [0.9]}}, "tokenizer.betas"),
        ({"tokenizer": {"warmup_steps": 1700}}, "tokenizer.warmup_steps"),
        ({"tokenizer": {"grad_clip": 0}}, "tokenizer.grad_clip"),
        ({"run": {"dist_timeout_s": 0}}, "run.dist_timeout_s"),
        ({"tokenizer": {"dist_timeout_s": 60}}, "tokenizer.dist_timeout_s"),
        ({"tokenizer": {"gan_weight": 0.1, "gan_start_step": 1500}}, "tokenizer.gan_start_step"),
        (
            {"prepare": {"image_size": 16}, "tokenizer": {"gan_weight": 0.1, "disc_layers": 3}},
            "tokenizer.disc_layers",
        ),
        ({"classifier": {"widths": []}}, "classifier.widths"),
        ({"classifier": {"widths": [16, 0]}}, "classifier.widths"),
        ({"classifier": {"embed_dim": 0}}, "classifier.embed_dim"),
        ({"run": {"dist_timeout_s": -5}}, "run.dist_timeout_s"),
        ({"run": {"dist_timeout_s": float("inf")}}, "run.dist_timeout_s"),
        ({"run": {"dist_timeout_s": "1h"}}, "run.dist_timeout_s"),
        ({"prepare": {"channels": 2}}, "prepare.channels"),
        ({"prepare": {"limit": 0}}, "prepare.limit"),
        ({"prepare": {"limit": True}}, "prepare.limit"),
        ({"prepare": {"maxcount": "many"}}, "prepare.maxcount"),
        ({"prepare": {"val_fraction": 1.0}}, "prepare.val_fraction"),
        ({"prepare": {"source": "folder"}}, "prepare.root"),
        ({"prepare": {"upload": "bucket/prefix"}}, "prepare.upload"),
        ({"prepare": {"imagesize": 32}}, "prepare.imagesize"),
        ({"prepare": {1: 32}}, "prepare.1"),
        ({"prepare": {None: 32}}, "prepare.None"),
        ({"tokenizer": {"downsample": 3}}, "tokenizer.downsample"),
        ({"prepare": [1, 2]}, "prepare"),
        ({"trainer": {}}, "trainer"),
        (["prepare"], "params"),
    ],
)
def test_errors_name_the_offending_key(raw, key):
    with pytest.raises(ValueError) as error:
        Params.from_dict(raw)
    assert str(error.value).startswith(f"{key}:")


def test_divisibility_error_says_what_to_use():
    with pytest.raises(ValueError, match=r"tokenizer\.downsample \(4\).*such as 28"):
        Params.from_dict({"prepare": {"image_size": 30}})


def test_a_discriminator_too_deep_for_the_images_says_how_deep_it_may_be():
    with pytest.raises(ValueError, match=r"image_size=16 .* \(step 0\); use tokenizer\.disc_layers <= 2$"):
        Params.from_dict({"prepare": {"image_size": 16}, "tokenizer": {"gan_weight": 0.1}})
    with pytest.raises(ValueError, match=r"use larger images or set tokenizer\.gan_weight to 0$"):
        tiny = {"gan_weight": 0.1, "downsample": 1, "channel_multipliers": [1]}
        Params.from_dict({"prepare": {"image_size": 4}, "tokenizer": tiny})
    # Without a GAN the discriminator is never built, so its depth does not matter.
    assert Params.from_dict({"prepare": {"image_size": 16}}).tokenizer.disc_layers == 3
    shallow = {"gan_weight": 0.1, "disc_layers": 2}
    assert Params.from_dict({"prepare": {"image_size": 16}, "tokenizer": shallow})


def test_load_params_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("prepare: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_params_yaml_states_exactly_the_library_defaults():
    # params.yaml is the documentation of every default: it must not drift from the dataclasses
    assert load_params(REPO / "params.yaml") == Params()


def test_floats_without_a_dot_load_as_floats_from_a_hand_written_file_and_after_an_override(tmp_path):
    import shutil

    from imtok.overrides import write_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", path)
    text = path.read_text().replace("  lr: ", "  lr: 3e-4  # was ", 1)
    path.write_text(text)
    assert load_params(path).tokenizer.lr == 3e-4  # YAML 1.2, as DVC reads it: not the string '3e-4'
    write_overrides(path, {"prior": {"lr": 5e-5}, "tokenizer": {"weight_decay": 1e-5}})
    params = load_params(path)
    assert params.prior.lr == 5e-5 and params.tokenizer.weight_decay == 1e-5


@pytest.mark.parametrize(("module", "what"), [("demos.profile", "profile"), ("flows.sweep", "sweep points")])
def test_a_profile_or_points_file_that_is_not_yaml_is_named_without_a_traceback(tmp_path, module, what):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer: [unclosed\n")
    done = subprocess.run(
        [sys.executable, "-m", module, str(bad)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"error: {what}: {bad} is not valid YAML" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_quantizer_option_has_a_type_the_params_rules_check():
    import inspect
    import typing

    from imtok.models.autoencoder import QUANTIZERS
    from imtok.typerules import value_matches

    for kind, cls in QUANTIZERS.items():
        hints = typing.get_type_hints(cls.__init__)
        for option in inspect.signature(cls).parameters.values():
            if option.kind == option.KEYWORD_ONLY:  # a quantizer_options key: its default must pass
                assert value_matches(option.default, hints[option.name])[0], (kind, option.name)


def test_quantizer_options_are_stated_per_quantizer_and_only_the_chosen_ones_reach_the_model():
    from imtok.models.autoencoder import QUANTIZERS, quantizer_option_defaults

    defaults = Params()
    assert set(defaults.tokenizer.quantizer_options) == set(QUANTIZERS)
    for kind in QUANTIZERS:  # every option of every quantizer, at its constructor's default
        assert defaults.tokenizer.quantizer_options[kind] == quantizer_option_defaults(kind)
    raw = {"tokenizer": {"quantizer": "vq", "quantizer_options": {"vq": {"kmeans_init": False}}}}
    params = Params.from_dict(raw)
    assert params.tokenizer.quantizer_options["vq"] == {
        **quantizer_option_defaults("vq"),
        "kmeans_init": False,
    }
    assert params.tokenizer_config(1, 28).quantizer_options == params.tokenizer.quantizer_options["vq"]
    fsq = Params.from_dict({"tokenizer": {"quantizer_options": {"vq": {"kmeans_init": False}}}})
    assert fsq.tokenizer_config(1, 28).quantizer_options == quantizer_option_defaults("fsq")
    empty = Params.from_dict({"tokenizer": {"quantizer_options": {"fsq": None}}})  # `fsq:` and nothing
    assert empty.tokenizer.quantizer_options["fsq"] == quantizer_option_defaults("fsq")


def test_the_older_flat_quantizer_options_say_how_to_write_them_now():
    with pytest.raises(ValueError) as error:
        Params.from_dict({"tokenizer": {"quantizer": "vq", "quantizer_options": {"beta": 0.5}}})
    assert "tokenizer.quantizer_options.beta: unknown quantizer" in str(error.value)
    assert "write {vq: {beta: ...}}" in str(error.value)


def test_a_set_param_on_another_quantizers_option_leaves_the_tokenizer_fingerprint_alone():
    from imtok.trainers.tokenizer import fingerprint

    base = Params().tokenizer
    other = Params.from_dict({"tokenizer": {"quantizer_options": {"vq": {"beta": 0.5}}}}).tokenizer
    chosen = Params.from_dict({"tokenizer": {"quantizer_options": {"fsq": {"noise_prob": 0.5}}}}).tokenizer
    meta = {"count": 1}
    assert fingerprint(base, 1, 28, meta) == fingerprint(other, 1, 28, meta)
    assert fingerprint(base, 1, 28, meta) != fingerprint(chosen, 1, 28, meta)


@pytest.mark.slow
def test_dvc_exp_run_sets_one_quantizer_option_without_hydras_plus(tmp_path):
    # The option exists in params.yaml, so DVC's -S sets it like any other key; the file DVC
    # rewrites still loads, with the option changed and the others at their defaults.
    import os
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    script = "import shutil; shutil.copy('params.yaml', 'used.yaml')"
    stage = {"cmd": f'{sys.executable} -c "{script}"', "params": ["tokenizer"], "outs": ["used.yaml"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"show": stage}}))

    names = {"GIT_AUTHOR_NAME": "ci", "GIT_COMMITTER_NAME": "ci"}
    emails = {"GIT_AUTHOR_EMAIL": "ci@example.org", "GIT_COMMITTER_EMAIL": "ci@example.org"}
    env = {**os.environ, **names, **emails}

    def run(*command: str) -> None:
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "baseline")
    option = "tokenizer.quantizer_options.vq.kmeans_init=false"
    run(sys.executable, "-m", "dvc", "exp", "run", "-q", "-S", option)
    used = load_params(tmp_path / "used.yaml").tokenizer.quantizer_options
    assert used["vq"]["kmeans_init"] is False
    assert {**used["vq"], "kmeans_init": True} == Params().tokenizer.quantizer_options["vq"]
    assert used["fsq"] == Params().tokenizer.quantizer_options["fsq"]
