"""DVC stage `evaluate_tokenizer`: the tokenizer's reconstruction metrics, the reference rows, its champion.

The tokenizer (``models/tokenizer``) on the whole val split: PSNR, SSIM, codebook usage (the fraction
of codes used at least once, as the FSQ paper measures it), perplexity, and rFID per feature
extractor (val images against their reconstructions). Reference rows with the same features: two
halves of val (the floor a perfect generator would reach with sets of that size) and val against as
many train images (the train/val gap).

Writes ``metrics/tokenizer.json``, ``metrics/reference.json`` (DVC metrics: numbers only),
``plots/codebook_usage.{csv,png}`` and ``plots/tokenizer_curves.{csv,png}`` (DVC plots; the PNGs open
without internet), ``reports/evaluate_tokenizer.json`` (which features the metrics used, why any were
left out, the promotion decision), logs the metrics and PNGs into the tokenizer's MLflow run, tags its
registry version and moves the ``champion`` alias when it beats the champion on
``evaluate.tokenizer_metric`` (see ``imtok.registry.promote_if_better``). Needs no prior: the study's
tokenizer sweep stops here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imtok import layout
from imtok.atomic import write_json
from imtok.evaluation import (
    collect_features,
    evaluation_extractors,
    log_eval_artifacts,
    record_tokenizer,
    reference_rows,
    split_batches,
    summary_of,
    tokenizer_metrics,
    tokenizer_pass,
    write_curves,
    write_usage_plot,
)
from imtok.params import Params
from imtok.plots import curves_png, usage_png
from stages.common import CLASSIFIER_PATH, stage_main

SHARDS_DIR = Path(layout.SHARDS)
TOKENIZER_DIR = Path(layout.TOKENIZER)
METRICS_DIR = Path(layout.METRICS)
PLOTS_DIR = Path(layout.PLOTS)
REPORT_PATH = Path(layout.REPORTS) / "evaluate_tokenizer.json"
# MLflow histories in plots/tokenizer_curves.csv; the study's convergence plot reads the val ones.
CURVES = ["train/loss", "train/psnr", "val/psnr", "train/codebook_usage_pct", "val/codebook_usage_pct"]


def evaluate_tokenizer(
    params: Params,
    *,
    shards_dir: Path = SHARDS_DIR,
    tokenizer_dir: Path = TOKENIZER_DIR,
    classifier_path: Path = CLASSIFIER_PATH,
    metrics_dir: Path = METRICS_DIR,
    plots_dir: Path = PLOTS_DIR,
    record: bool = True,
) -> dict[str, Any]:
    """Measure, write the metrics and plots, and (``record``) log them to MLflow and promote."""
    from imtok.models.files import load_tokenizer

    settings = params.evaluate
    device, extractors, features = evaluation_extractors(params, classifier_path)
    tokenizer, _ = load_tokenizer(tokenizer_dir)
    val = tokenizer_pass(
        tokenizer.to(device), split_batches(shards_dir / "val", settings.batch_size), extractors, device
    )
    metrics = tokenizer_metrics(val.totals, val.counter, val.real, val.reconstructed, val.stage_counters)
    train = collect_features(
        extractors, split_batches(shards_dir / "train", settings.batch_size, limit=val.totals.count)
    )
    reference = reference_rows(val.real, train)
    write_json(metrics_dir / "tokenizer.json", metrics)
    write_json(metrics_dir / "reference.json", reference)
    write_usage_plot(val.counter, plots_dir / "codebook_usage.csv")
    usage_png(val.counter.counts, plots_dir / "codebook_usage.png")
    summary = summary_of(tokenizer_dir, "tokenizer.json")
    run_id = summary.get("mlflow_run_id")
    write_curves(run_id, CURVES, plots_dir / "tokenizer_curves.csv")
    curves_png(plots_dir / "tokenizer_curves.csv", plots_dir / "tokenizer_curves.png", "tokenizer training")
    promotion = {}
    if record:
        promotion = record_tokenizer(params, summary, metrics)
        log_eval_artifacts(run_id, [plots_dir / "codebook_usage.png", plots_dir / "tokenizer_curves.png"])
    return {"features": features, "tokenizer": metrics, "reference": reference, "promotion": promotion}


def evaluate_and_print(params: Params, _args: Any) -> dict[str, Any]:
    results = evaluate_tokenizer(params)
    print("tokenizer on val: " + ", ".join(f"{k} {v:.4g}" for k, v in results["tokenizer"].items()))
    if results["promotion"]:
        print(f"tokenizer: {results['promotion']['reason']}")
    return {"features": results["features"], "promotion": results["promotion"]}


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, evaluate_and_print, report_path=REPORT_PATH, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
