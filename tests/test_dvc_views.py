"""What a DVC user reads after a sweep of two quantizers: `dvc metrics show/diff`, `dvc exp show` with the
README's command, `dvc plots diff` with PNGs that open without internet. A tiny project of its own."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex

import pytest
from project_factory import REPO, TINY_PARAMS, environment, make_project, run

HEADLINE = {"psnr", "ssim", "codebook_usage_pct", "perplexity", "rfid_fmnist", "fid_fmnist"}
PNG_PLOTS = ("plots/codebook_usage.png", "plots/tokenizer_curves.png", "plots/prior_curves.png")


def numeric_leaves(value: object) -> list[object]:
    """Every leaf of nested dicts that is not a number (an empty list when all are numbers)."""
    if isinstance(value, dict):
        return [leaf for inner in value.values() for leaf in numeric_leaves(inner)]
    return [] if isinstance(value, int | float) and not isinstance(value, bool) else [value]


def readme_exp_show() -> list[str]:
    """The `dvc exp show` command the README tells a user to type, as arguments."""
    found = re.search(r"^\s*(dvc exp show [^\n#]+)", (REPO / "README.md").read_text(), re.M)
    assert found, "README.md shows no `dvc exp show` command"
    return shlex.split(found.group(1).strip())


@pytest.mark.slow
def test_a_two_quantizer_sweep_reads_as_params_that_differ_and_headline_numbers(tmp_path):
    root = make_project(tmp_path / "views", TINY_PARAMS)
    env = environment(root)
    run(["dvc", "repro"], root, env)
    run(["git", "add", "-A"], root, env)  # as the README says: dvc.lock with metrics, reports, plots
    run(["git", "commit", "-qm", "baseline"], root, env)

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root, env))
    files = shown[""]["data"]
    assert set(files) == {"metrics/tokenizer.json", "metrics/reference.json", "metrics/generation.json"}
    assert numeric_leaves({path: entry["data"] for path, entry in files.items()}) == []  # numbers only

    for quantizer in ("vq", "fsq"):
        run(["dvc", "exp", "run", "-q", "-n", quantizer, "-S", f"tokenizer.quantizer={quantizer}"], root, env)

    table = run([*readme_exp_show(), "--csv", "--no-pager"], root, env)
    rows = list(csv.DictReader(io.StringIO(table[table.index("Experiment") :])))
    columns = set(rows[0])
    assert columns >= HEADLINE, columns
    assert "tokenizer.quantizer" in columns  # the one param that differs
    assert not [c for c in columns if "/" in c or c in ("Created", "codes_used")], columns  # no deps
    assert {row["Experiment"] for row in rows} >= {"vq", "fsq"}
    assert len(columns) <= 16, columns  # about 160 terminal columns at 3 decimals

    diff = json.loads(run(["dvc", "metrics", "diff", "fsq", "vq", "--json"], root, env))
    assert set(diff) <= {"metrics/tokenizer.json", "metrics/generation.json"}  # the reference rows stand
    assert {"psnr", "codebook_usage_pct"} <= set(diff["metrics/tokenizer.json"])

    out = tmp_path / "plots-diff"
    run(["dvc", "plots", "diff", "fsq", "vq", "-o", str(out)], root, env)
    from PIL import Image

    for path in PNG_PLOTS:
        for revision in ("fsq", "vq"):
            image = out / "static" / f"{revision}_{path.replace('/', '_')}"
            with Image.open(image) as png:
                assert png.size[0] > 300 and png.size[1] > 200, image
    report = json.loads((root / "reports" / "evaluate_tokenizer.json").read_text())
    assert report["features"]["used"] == ["fmnist"] and "inception" in report["features"]["skipped"]
