"""DVC stage `sample`: the prior generates token grids, its tokenizer decodes them into image shards.

Reads the ``sample`` params section. The prior comes from ``sample.prior`` (``models/prior`` or an
MLflow URI); the tokenizer is ``sample.tokenizer`` or, when null, the one the prior was trained on as
its metadata records. A tokenizer whose checksum (when the prior records one) or codebook size differs
from the prior's is refused; images come out at the prior's token grid times the tokenizer's factor f
(for residual FSQ, whose S stages are stacked along the grid's height, the height over S times f).
A class-conditional prior makes ``per_class`` images of every class, an unconditional one ``count``.
MaskGIT decodes in ``steps`` parallel steps, GPT samples token by token with its KV cache; both take a
seeded generator, so the same params give the same images.

Writes ``data/samples`` (image shards ``{__key__, png, cls}`` with meta.json, readable by every image
reader of imtok), ``reports/samples.png`` (one row per class) and ``reports/sample.json``; logs the
grid to an MLflow run of this stage.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from imtok import layout
from imtok.params import Params
from stages.common import stage_main

log = logging.getLogger("stages.sample")

STAGE = "sample"
SAMPLES_DIR = Path(layout.SAMPLES)
GRID_PATH = Path(layout.REPORTS) / "samples.png"
REPORT_PATH = Path(layout.REPORTS) / "sample.json"


def sample_and_log(params: Params, _args: Any) -> dict[str, Any]:
    """``sample`` inside an MLflow run of this stage that keeps the grid."""
    from imtok import tracking
    from imtok.generation import sample

    with tracking.stage_run(STAGE, {"sample": dataclasses.asdict(params.sample)}, system_metrics=False):
        report = sample(
            params.sample, samples_dir=SAMPLES_DIR, grid_path=GRID_PATH, device=params.run.sample.device
        )
        tracking.log_artifact(GRID_PATH, "samples")
        tracking.log_metrics({"sample/images_per_s": report["images_per_s"]}, 0)
    log.info("%d samples in %s, grid %s", report["count"], SAMPLES_DIR, report["grid"])
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, sample_and_log, report_path=REPORT_PATH, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
