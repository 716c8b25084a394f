"""DVC stage `train_prior`: token shards -> models/prior/, one MLflow run, a registered model.

Run as ``python -m stages.train_prior`` (or under ``torchrun``). Reads the ``prior`` params section and
``data/tokens/{train,val}``; the codebook size, token grid and class names come from the token shards,
which must agree between the splits and name the same tokenizer. Writes

- ``models/prior/prior.pt`` (weights-only model file: kind, config, weights, and the tokenizer it was
  trained on: location, registry URI, SHA-256) and ``prior.json`` (summary, registered version);
- ``reports/train_prior.json`` (DVC metrics: val loss, perplexity, masked-token accuracy);
- checkpoints under ``checkpoints/prior/<fingerprint>/`` (params, token shards and code, as for the
  tokenizer); a re-run after a kill resumes, a re-run after a code change trains anew.

The MLflow run records the prior's params and the tokenizer's provenance as params; the model is
registered as ``imtok-prior`` with alias ``candidate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from imtok import layout
from imtok.data.tokens import TokenSplit, load_token_split
from imtok.params import Params, PriorParams
from imtok.runtime import (
    Runtime,
    agreed_fingerprint,
    code_digest,
    run_fingerprint,
    setup_runtime,
    shutdown_runtime,
)
from stages.common import Registration, export_model, no_register_option, stage_main, training_run

log = logging.getLogger("stages.train_prior")

STAGE = "train_prior"
TOKENS_DIR = Path(layout.TOKENS)
OUT_DIR = Path(layout.PRIOR)
CHECKPOINT_ROOT = Path(layout.CHECKPOINTS) / "prior"
REPORT_PATH = Path(layout.REPORTS) / "train_prior.json"
REGISTERED_NAME = "imtok-prior"
MODEL_DESCRIPTION = (
    "Priors over imtok tokens (MaskGIT or GPT) trained by the train_prior stage, one version per run. "
    "Each version names its tokenizer (URI and checksum), codebook, token grid, classes and val loss; "
    "alias candidate is the newest, champion the best on evaluate.prior_metric."
)
MODEL_FILE = "prior.pt"
# What train and val must share: otherwise they were extracted by different tokenizers.
SHARED_KEYS = ("codebook_size", "grid", "tokenizer_sha256")


def check_token_splits(train: TokenSplit, val: TokenSplit, tokens_dir: Path) -> None:
    """Train and val token shards must come from one tokenizer; errors name both values."""
    for key in SHARED_KEYS:
        if train.meta.get(key) != val.meta.get(key):
            raise ValueError(
                f"{tokens_dir / 'val'}: {key} {val.meta.get(key)!r} differs from {tokens_dir / 'train'}'s "
                f"{train.meta.get(key)!r}; extract both splits with the same tokenizer (run extract_tokens)"
            )


def tokenizer_provenance(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokenizer": meta.get("tokenizer"),
        "tokenizer_uri": meta.get("tokenizer_uri"),
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
    }


def train(
    params: Params,
    *,
    tokens_dir: Path = TOKENS_DIR,
    out_dir: Path = OUT_DIR,
    checkpoint_root: Path = CHECKPOINT_ROOT,
    register: bool = True,
    runtime: Runtime | None = None,
) -> dict[str, Any] | None:
    """Train, export and register the prior; returns the report on the main process (else None)."""
    from imtok import tracking
    from imtok.trainers.prior import evaluate_prior, prior_config, train_prior

    section = params.prior
    train_split, val_split = load_token_split(tokens_dir / "train"), load_token_split(tokens_dir / "val")
    check_token_splits(train_split, val_split, tokens_dir)
    meta = train_split.meta
    class_names = list(meta.get("class_names") or [])
    num_classes = len(class_names) or int(train_split.labels.max()) + 1
    grid = (int(meta["grid"][0]), int(meta["grid"][1]))
    config = prior_config(section, int(meta["codebook_size"]), grid, num_classes)
    runtime = runtime or setup_runtime(
        section.device, section.precision, prefix="prior", dist_timeout_s=params.run.dist_timeout_s
    )
    token_identity = json.dumps(
        {k: v for k, v in meta.items() if k != "shards"} | {"shards": meta["shards"]}, sort_keys=True
    )
    run_key = run_fingerprint(
        {**section.as_dict(), "tokens": token_identity, "code": code_digest(__file__)},
        PriorParams.RUNTIME_KEYS,
    )
    run_key = agreed_fingerprint(run_key, runtime, "prior")
    checkpoint_dir = checkpoint_root / run_key
    provenance = tokenizer_provenance(meta)
    logged = {
        **dataclasses.asdict(params),
        "tokens": {**provenance, "grid": list(grid), "count": meta["count"]},
    }
    tags = {"imtok.fingerprint": run_key, "imtok.prior": section.kind}
    with training_run(STAGE, logged, tags, checkpoint_dir, runtime.is_main) as run:
        result = train_prior(
            section,
            config,
            train=train_split,
            val=val_split,
            checkpoint_dir=checkpoint_dir,
            runtime=runtime,
            on_metrics=tracking.log_metrics if runtime.is_main else None,
            checkpoint_extra={"mlflow_run_id": run.info.run_id if run else None, "fingerprint": run_key},
        )
        if not runtime.is_main:
            return None
        model = result.model.eval()
        final = evaluate_prior(
            section.kind,
            model,
            val_split,
            runtime.device,
            batch_size=section.batch_size,
            conditional=section.conditional,
        )
        tracking.log_metrics({f"final/{name}": value for name, value in final.items()}, result.step)
        model = model.cpu()
        summary: dict[str, Any] = {
            "stage": STAGE,
            "kind": section.kind,
            "step": result.step,
            "fingerprint": run_key,
            "codebook_size": config.codebook_size,
            "grid": list(grid),
            "num_classes": config.num_classes,
            "class_names": class_names,
            "image_size": meta.get("image_size"),
            "channels": meta.get("channels"),
            **provenance,
            "git_commit": tracking.git_commit(),
            "mlflow_run_id": run.info.run_id,
            "val": final,
        }

        def registration() -> Registration:
            tokenizer = provenance["tokenizer_uri"] or provenance["tokenizer"]
            conditional = "class-conditional" if config.num_classes else "unconditional"
            tags = {
                "prior": section.kind,
                "codebook_size": config.codebook_size,
                "token_grid": "x".join(map(str, grid)),
                "num_classes": config.num_classes,
                "tokenizer_uri": tokenizer,
                "tokenizer_sha256": provenance["tokenizer_sha256"],
                "git_commit": summary["git_commit"],
                "fingerprint": run_key,
                "val_loss": f"{final['loss']:.4f}",
            }
            description = (
                f"{section.kind} prior, {conditional}, over {config.codebook_size} codes on a "
                f"{tags['token_grid']} grid; val loss {final['loss']:.4f}; tokenizer {tokenizer}"
            )
            return Registration(REGISTERED_NAME, grid, tags, description, MODEL_DESCRIPTION, "int64")

        export_model(
            out_dir,
            kind="prior",
            model_file=MODEL_FILE,
            config={"kind": section.kind, "model": dataclasses.asdict(config)},
            model=model,
            summary=summary,
            registration=registration if register else None,
        )
        return {
            "step": result.step,
            "resumed_from_step": result.start_step,
            "seconds": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "precision": runtime.precision,
            "world_size": runtime.world_size,
            "val": {name: round(value, 5) for name, value in final.items()},
        }


def train_in_runtime(params: Params, args: Any) -> dict[str, Any] | None:
    section = params.prior
    runtime = setup_runtime(
        section.device, section.precision, prefix="prior", dist_timeout_s=params.run.dist_timeout_s
    )
    try:
        return train(params, register=not args.no_register, runtime=runtime)
    finally:
        shutdown_runtime(runtime)


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        __doc__, train_in_runtime, report_path=REPORT_PATH, argv=argv, options=no_register_option
    )


if __name__ == "__main__":
    raise SystemExit(main())
