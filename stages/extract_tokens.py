"""DVC stage `extract_tokens`: image shards -> token shards in data/tokens/{train,val}.

Encodes every image of each split with the tokenizer named by ``extract.tokenizer`` (the
``models/tokenizer`` directory the previous stage wrote, or an MLflow model URI such as
``models:/imtok-tokenizer@champion``), batched, without gradients, and writes one token shard per
image shard (same name, same samples in stored order) plus a meta.json recording the tokenizer's
location, registry URI and SHA-256. ``run.extract.num_workers`` loader processes decode shards while the model
encodes; under ``torchrun`` each process encodes its share of the shards (``imtok.extraction``), and
the output is byte-identical whatever the process and worker counts. With ``extract.flip`` the train
split also gets the tokens of each image flipped left-right (key suffix ``_hflip``; image keys that
already end so are refused).
reports/extract_tokens.json holds count, codebook usage, perplexity and seconds per split.
"""

from __future__ import annotations

from pathlib import Path

from imtok import layout
from stages.common import stage_main

SHARDS_DIR = Path(layout.SHARDS)
TOKENS_DIR = Path(layout.TOKENS)
REPORT_PATH = Path(layout.REPORTS) / "extract_tokens.json"


def main(argv: list[str] | None = None) -> int:
    from imtok.extraction import extract

    return stage_main(
        __doc__,
        lambda params, _: extract(
            params.extract,
            shards_dir=SHARDS_DIR,
            tokens_dir=TOKENS_DIR,
            run=params.run.extract,
            dist_timeout_s=params.run.dist_timeout_s,
        ),
        report_path=REPORT_PATH,
        argv=argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
