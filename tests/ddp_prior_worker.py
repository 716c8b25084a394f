"""One rank of the 2-process DDP prior test: train a tiny prior under torchrun, save this rank's weights.

Usage: torchrun --nproc-per-node 2 ... tests/ddp_prior_worker.py OUT_DIR KIND [per-rank-checkpoints]

With ``per-rank-checkpoints`` each rank keeps its checkpoints in its own OUT_DIR/checkpoints-rankR, as
ranks on nodes that do not share a mount would.
"""

import sys
from pathlib import Path

import torch

from imtok.data.tokens import TokenSplit
from imtok.params import Params
from imtok.runtime import setup_runtime, shutdown_runtime
from imtok.trainers.prior import build_prior, prior_config, train_prior

CODES, GRID, CLASSES, COUNT = 32, (4, 4), 4, 64


def token_split() -> TokenSplit:
    """The same seeded token grids on every rank (class-dependent patterns plus noise)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(COUNT) % CLASSES
    tokens = (labels.view(-1, 1, 1) * 7 + torch.randint(0, 3, (COUNT, *GRID), generator=generator)) % CODES
    meta = {"codebook_size": CODES, "grid": list(GRID), "class_names": [str(c) for c in range(CLASSES)]}
    return TokenSplit(tokens, labels, [f"{index:04d}" for index in range(COUNT)], meta)


def main() -> None:
    out, kind = Path(sys.argv[1]), sys.argv[2]
    per_rank = sys.argv[3:] == ["per-rank-checkpoints"]
    torch.set_num_threads(1)
    prior = {"kind": kind, "hidden_dim": 16, "depth": 1, "heads": 2, "dropout": 0.0, "batch_size": 8}
    prior |= {"total_steps": 3, "warmup_steps": 1}
    run = {"val_batches": 0, "checkpoint_every": 100, "device": "cpu"}
    params = Params.from_dict({"prior": prior, "run": {"prior": run}})
    config = prior_config(params.prior, CODES, GRID, CLASSES)
    torch.manual_seed(params.prior.seed)  # the initial weights train_prior starts from
    initial = {name: value.detach().clone() for name, value in build_prior(kind, config).state_dict().items()}
    runtime = setup_runtime("cpu", "fp32", prefix="prior")
    try:
        result = train_prior(
            params.prior,
            config,
            run=params.run.prior,
            train=token_split(),
            val=None,
            checkpoint_dir=out / (f"checkpoints-rank{runtime.rank}" if per_rank else "checkpoints"),
            runtime=runtime,
        )
        state = {name: value.detach().clone() for name, value in result.model.state_dict().items()}
        torch.save(
            {"world_size": runtime.world_size, "step": result.step, "state": state, "initial": initial},
            out / f"rank{runtime.rank}.pt",
        )
    finally:
        shutdown_runtime(runtime)


if __name__ == "__main__":
    main()
