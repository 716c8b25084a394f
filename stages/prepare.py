"""DVC stage `prepare`: source images -> WebDataset shards in data/shards/{train,val}.

Reads ``prepare.*`` (and ``tokenizer.downsample`` for the image size check) from params.yaml, writes
both splits, optionally uploads them to S3, and writes reports/prepare.json with the counts and every
skipped (unreadable) file. Run as ``python -m stages.prepare`` from the repository root.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from imtok import layout
from imtok.data.s3 import upload_split
from imtok.data.shards import write_split
from imtok.data.sources import SPLITS, source_from_params
from imtok.params import PrepareParams
from stages.common import stage_main

log = logging.getLogger("stages.prepare")

SHARDS_DIR = Path(layout.SHARDS)
DOWNLOAD_DIR = Path(layout.RAW)
REPORT_PATH = Path(layout.REPORTS) / "prepare.json"


def prepare(
    params: PrepareParams,
    shards_dir: Path = SHARDS_DIR,
    download_dir: Path = DOWNLOAD_DIR,
    workers: int = 0,
) -> dict[str, Any]:
    """Write both splits of the configured source, ``workers`` processes encoding images
    (``run.prepare.num_workers``); returns the stage report."""
    started = time.perf_counter()
    source = source_from_params(params, download_dir)
    log.info("source %s at %s, classes: %s", source.kind, source.location, ", ".join(source.class_names))
    report: dict[str, Any] = {
        "source": source.kind,
        "location": source.location,
        "image_size": params.image_size,
        "channels": params.channels,
        "encode_workers": workers,
        "skipped_files": [],
    }
    for split in SPLITS:
        result = write_split(
            source,
            split,
            shards_dir / split,
            maxcount=params.maxcount,
            maxsize=params.maxsize,
            limit=params.limit,
            seed=params.seed,
            workers=workers,
        )
        log.info(
            "%s: %d images in %d shards, %d skipped, %.1f s",
            split,
            result.count,
            len(result.shards),
            len(result.skipped),
            result.seconds,
        )
        report[split] = {
            "count": result.count,
            "shards": len(result.shards),
            "skipped": len(result.skipped),
            "images_per_s": round((result.count + len(result.skipped)) / max(result.seconds, 1e-9), 1),
        }
        report["skipped_files"] += [
            {"split": split, "file": skipped.origin, "key": skipped.key, "reason": skipped.reason}
            for skipped in result.skipped
        ]
        if params.upload:
            prefix = f"{params.upload.rstrip('/')}/{split}"
            upload_split(shards_dir / split, prefix)
            report[split]["uploaded_to"] = prefix
            log.info("%s: uploaded to %s", split, prefix)
    report["skipped_total"] = len(report["skipped_files"])
    report["seconds"] = round(time.perf_counter() - started, 2)
    if report["skipped_total"]:
        log.warning(
            "skipped %d unreadable image(s), listed in %s: %s",
            report["skipped_total"],
            REPORT_PATH,
            "; ".join(f"{s['file']} ({s['reason']})" for s in report["skipped_files"]),
        )
    return report


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        __doc__,
        lambda params, _: prepare(params.prepare, workers=params.run.prepare.num_workers),
        report_path=REPORT_PATH,
        argv=argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
