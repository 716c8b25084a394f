"""One rank of the 2-process DDP test: train a tiny tokenizer under torchrun, save this rank's weights.

Usage: torchrun --nproc-per-node 2 ... tests/ddp_tokenizer_worker.py SHARDS_DIR OUT_DIR QUANTIZER
"""

import sys
from pathlib import Path

import torch

from imtok.params import Params
from imtok.runtime import setup_runtime, shutdown_runtime
from imtok.trainers.tokenizer import train_tokenizer


def main() -> None:
    shards, out, quantizer = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    params = Params.from_dict(
        {
            "prepare": {"source": "synthetic", "image_size": 16},
            "tokenizer": {
                "quantizer": quantizer,
                "codebook_size": 256 if quantizer == "fsq" else 64,  # fsq: the paper's levels for 2^8
                "base_channels": 8,
                "batch_size": 8,
                "total_steps": 3,
                "warmup_steps": 1,
            },
            "run": {"tokenizer": {"val_batches": 0, "checkpoint_every": 100, "device": "cpu"}},
        }
    )
    runtime = setup_runtime("cpu", "fp32")
    try:
        result = train_tokenizer(
            params.tokenizer,
            params.tokenizer_config(1, 16),
            run=params.run.tokenizer,
            train_dir=shards / "train",
            val_dir=shards / "val",
            checkpoint_dir=out / "checkpoints",
            runtime=runtime,
        )
        state = {name: value.detach().clone() for name, value in result.model.state_dict().items()}
        torch.save(
            {"world_size": runtime.world_size, "step": result.step, "state": state},
            out / f"rank{runtime.rank}.pt",
        )
    finally:
        shutdown_runtime(runtime)


if __name__ == "__main__":
    main()
