"""DVC stage `evaluate`: the prior's samples against the val split, and the prior's champion.

Prior samples (``data/samples``) against val, per feature extractor: FID, precision and recall
(k-NN manifolds), and the domain classifier's accuracy on the requested class. The standard FID
InceptionV3 is used when its weights are on this machine (metrics ``fid``, ...), and the domain
classifier of ``train_classifier`` always (``fid_<name>``, ...); ``metrics/reference.json`` (written by
``evaluate_tokenizer`` with the same features) holds the rows to read them against.

Writes ``metrics/generation.json`` (DVC metrics: numbers only), ``plots/prior_curves.{csv,png}`` (DVC
plots; the PNG opens without internet) and ``reports/evaluate.json`` (which features the metrics used,
why any were left out, the promotion decision), logs the metrics and the PNG into the MLflow run of
the prior that made the samples (``sample.prior`` as ``data/samples/meta.json`` records it), tags its
registry version and moves the ``champion`` alias in the direction of ``evaluate.prior_metric``.
Sample metrics of a prior that cannot be matched to one registry version promote nothing, and the
output says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imtok import layout
from imtok.atomic import write_json
from imtok.data.shards import META_NAME, read_meta
from imtok.evaluation import (
    check_same_shape,
    collect_features,
    evaluation_extractors,
    generation_metrics,
    log_eval_artifacts,
    record_prior,
    split_batches,
    summary_of,
    write_curves,
)
from imtok.params import Params
from imtok.plots import curves_png
from stages.common import CLASSIFIER_PATH, stage_main

SHARDS_DIR = Path(layout.SHARDS)
SAMPLES_DIR = Path(layout.SAMPLES)
PRIOR_DIR = Path(layout.PRIOR)
METRICS_DIR = Path(layout.METRICS)
PLOTS_DIR = Path(layout.PLOTS)
REPORT_PATH = Path(layout.REPORTS) / "evaluate.json"
CURVES = ["train/loss", "val/loss", "val/accuracy"]


def evaluate(
    params: Params,
    *,
    shards_dir: Path = SHARDS_DIR,
    samples_dir: Path = SAMPLES_DIR,
    prior_dir: Path = PRIOR_DIR,
    classifier_path: Path = CLASSIFIER_PATH,
    metrics_dir: Path = METRICS_DIR,
    plots_dir: Path = PLOTS_DIR,
    record: bool = True,
) -> dict[str, Any]:
    """Measure, write the metrics and plot, and (``record``) log them to MLflow and promote."""
    settings = params.evaluate
    _, extractors, features = evaluation_extractors(params, classifier_path)
    classifier = next((e.classifier for e in extractors if hasattr(e, "classifier")), None)
    generation: dict[str, float] = {}
    if (samples_dir / META_NAME).is_file():
        sample_meta = read_meta(samples_dir)
        val_dir = shards_dir / "val"
        check_same_shape(samples_dir, sample_meta, val_dir, read_meta(val_dir))
        real = collect_features(extractors, split_batches(val_dir, settings.batch_size))
        generation = generation_metrics(
            real, split_batches(samples_dir, settings.batch_size), extractors, classifier
        )
        generation["conditional"] = float(bool(sample_meta.get("conditional")))
    write_json(metrics_dir / "generation.json", generation)
    summary = summary_of(prior_dir, "prior.json")
    write_curves(summary.get("mlflow_run_id"), CURVES, plots_dir / "prior_curves.csv")
    curves_png(plots_dir / "prior_curves.csv", plots_dir / "prior_curves.png", "prior training")
    promotion = {}
    if record:
        promotion = record_prior(params, generation, samples_dir)
        log_eval_artifacts(summary.get("mlflow_run_id"), [plots_dir / "prior_curves.png"])
    return {"features": features, "generation": generation, "promotion": promotion}


def evaluate_and_print(params: Params, _args: Any) -> dict[str, Any]:
    results = evaluate(params)
    generation = results["generation"]
    print("samples against val: " + ", ".join(f"{k} {v:.4g}" for k, v in generation.items()))
    if results["promotion"]:
        print(f"prior: {results['promotion']['reason']}")
    return {"features": results["features"], "promotion": results["promotion"]}


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, evaluate_and_print, report_path=REPORT_PATH, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
