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

from pathlib import Path
from typing import Any

from imtok import layout
from imtok.params import Params
from imtok.runtime import setup_runtime, shutdown_runtime
from stages.common import no_register_option, stage_main

TOKENS_DIR = Path(layout.TOKENS)
OUT_DIR = Path(layout.PRIOR)
CHECKPOINT_ROOT = Path(layout.CHECKPOINTS) / "prior"
REPORT_PATH = Path(layout.REPORTS) / "train_prior.json"


def train(params: Params, args: Any) -> dict[str, Any] | None:
    """``imtok.trainers.prior.train_and_export`` at the pipeline's paths, in this process's runtime."""
    from imtok.trainers.prior import train_and_export

    device, precision = params.run.prior.device, params.prior.precision
    runtime = setup_runtime(device, precision, prefix="prior", dist_timeout_s=params.run.dist_timeout_s)
    try:
        return train_and_export(
            params,
            tokens_dir=TOKENS_DIR,
            out_dir=OUT_DIR,
            checkpoint_root=CHECKPOINT_ROOT,
            runtime=runtime,
            register=not args.no_register,
        )
    finally:
        shutdown_runtime(runtime)


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, train, report_path=REPORT_PATH, argv=argv, options=no_register_option)


if __name__ == "__main__":
    raise SystemExit(main())
