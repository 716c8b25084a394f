"""params.schema.json: current with imtok.params and params.yaml's comments, accepts params.yaml, and
refuses what check_params refuses key by key (an unknown key, a value of the wrong type)."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from imtok.params import load_yaml
from imtok.schema import SCHEMA_FILE, schema_text

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_schema_is_current():
    committed = (REPO / SCHEMA_FILE).read_text()
    assert committed == schema_text((REPO / "params.yaml").read_text()), (
        f"{SCHEMA_FILE} is stale: run `python -m imtok.schema --write` and commit it"
    )


def test_params_yaml_names_its_schema_for_editors():
    assert (REPO / "params.yaml").read_text().splitlines()[
        0
    ] == f"# yaml-language-server: $schema={SCHEMA_FILE}"


def test_the_schema_accepts_params_yaml_and_carries_its_defaults_and_comments():
    schema = json.loads((REPO / SCHEMA_FILE).read_text())
    params = load_yaml((REPO / "params.yaml").read_text())
    jsonschema.validate(params, schema)
    steps = schema["$defs"]["TokenizerParams"]["properties"]["total_steps"]
    assert steps["type"] == "integer" and steps["default"] == params["tokenizer"]["total_steps"]
    assert "FSQ" in steps["description"]  # the comment beside the key in params.yaml


@pytest.mark.parametrize(
    ("section", "key", "value", "complaint"),
    [
        ("tokenizer", "learning_rate", 0.01, "Additional properties"),  # the misspelling of #26
        ("tokenizer", "total_steps", "many", "is not of type 'integer'"),
        ("prepare", "source", "imagenet", "is not one of"),
        ("optimizer", None, {}, "Additional properties"),  # an unknown section
    ],
)
def test_the_schema_refuses_unknown_keys_and_wrong_types(section, key, value, complaint):
    schema = json.loads((REPO / SCHEMA_FILE).read_text())
    params = copy.deepcopy(load_yaml((REPO / "params.yaml").read_text()))
    if key is None:
        params[section] = value
    else:
        params[section][key] = value
    with pytest.raises(jsonschema.ValidationError, match=complaint):
        jsonschema.validate(params, schema)
