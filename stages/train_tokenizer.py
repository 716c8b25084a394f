"""DVC stage `train_tokenizer`: image shards -> models/tokenizer/, one MLflow run, a registered model.

Run from the repository root as ``python -m stages.train_tokenizer``, or on N GPUs / processes as
``torchrun --nproc-per-node N -m stages.train_tokenizer``. Reads the ``tokenizer`` params section and
``data/shards/{train,val}``; writes

- ``models/tokenizer/tokenizer.pt`` (weights-only model file) and ``tokenizer.json`` (config, provenance,
  the registered MLflow version), ``reconstructions.png`` (val inputs over their reconstructions);
- ``reports/train_tokenizer.json`` (DVC metrics: full val split PSNR, codebook usage, perplexity);
- checkpoints under ``checkpoints/tokenizer/<fingerprint>/``, the fingerprint hashing every param that
  changes what is computed (not logging or checkpoint intervals), the train split's meta.json and the
  code (``imtok.runtime.code_digest``). A run killed midway and started again with the same params and
  code resumes from its newest checkpoint; after a code change it trains anew.

MLflow: one run (resumed runs continue it) with all params, git commit and stage tags, train/ and val/
metrics, reconstruction grids and system metrics; the model is registered as ``imtok-tokenizer`` with
alias ``candidate``. The ``--no-register`` flag skips logging the model (quick local experiments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imtok import layout
from imtok.params import Params
from imtok.runtime import setup_runtime, shutdown_runtime
from stages.common import no_register_option, stage_main

SHARDS_DIR = Path(layout.SHARDS)
OUT_DIR = Path(layout.TOKENIZER)
CHECKPOINT_ROOT = Path(layout.CHECKPOINTS) / "tokenizer"
REPORT_PATH = Path(layout.REPORTS) / "train_tokenizer.json"


def train(params: Params, args: Any) -> dict[str, Any] | None:
    """``imtok.trainers.tokenizer.train_and_export`` at the pipeline's paths, in this process's runtime."""
    from imtok.trainers.tokenizer import train_and_export

    device, precision = params.run.tokenizer.device, params.tokenizer.precision
    runtime = setup_runtime(device, precision, dist_timeout_s=params.run.dist_timeout_s)
    try:
        return train_and_export(
            params,
            shards_dir=SHARDS_DIR,
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
