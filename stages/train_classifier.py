"""DVC stage `train_classifier`: the domain feature network, trained on the real image shards.

Generation and reconstruction metrics are also computed on the embedding of this classifier,
always, under their own names (``fid_<classifier.name>``, never ``fid``); the standard InceptionV3
metrics come beside them only when its weights are on the machine. It also scores class-conditional
samples (accuracy on the requested class). Trains on
``data/shards/train``, measures accuracy on ``data/shards/val`` and fails when it stays below
``classifier.min_accuracy``: features of a weak classifier would make the metrics mislead. Writes
``models/classifier/classifier.pt`` and ``reports/train_classifier.json``; checkpoints under
``checkpoints/classifier/<fingerprint>/`` (params, train split and code), so a killed run resumes.
"""

from __future__ import annotations

from pathlib import Path

from imtok import layout
from stages.common import CLASSIFIER_PATH, stage_main

SHARDS_DIR = Path(layout.SHARDS)
REPORT_PATH = Path(layout.REPORTS) / "train_classifier.json"
CHECKPOINT_ROOT = Path(layout.CHECKPOINTS) / "classifier"


def main(argv: list[str] | None = None) -> int:
    from imtok.trainers.classifier import train_and_export

    return stage_main(
        __doc__,
        lambda params, _: train_and_export(
            params.classifier,
            shards_dir=SHARDS_DIR,
            out_path=CLASSIFIER_PATH,
            checkpoint_root=CHECKPOINT_ROOT,
            device=params.run.classifier.device,
        ),
        report_path=REPORT_PATH,
        argv=argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
