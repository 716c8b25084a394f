"""Code counting without a data-dependent output size: same counts as bincount, one compiled graph."""

import pytest
import torch

from imtok.models.autoencoder import Tokenizer, TokenizerConfig
from imtok.quantizers.common import code_counts, code_histogram, scatter_counts


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_code_counts_equal_bincount_over_every_code(dtype):
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 300, (4, 9, 11), generator=generator, dtype=dtype)  # codes 300..511 unused
    counts = code_counts(indices, 512)
    assert counts.dtype == torch.int64 and counts.shape == (512,)
    assert torch.equal(counts, torch.bincount(indices.reshape(-1).long(), minlength=512))
    assert int(counts.sum()) == indices.numel() and int(counts[300:].sum()) == 0
    assert torch.equal(code_histogram(indices, 512), counts.float())
    assert torch.equal(scatter_counts(indices, 512), counts)  # the CUDA and compiled path


def test_code_counts_of_no_indices_are_zeros():
    assert torch.equal(
        code_counts(torch.zeros(0, 3, 3, dtype=torch.int64), 8), torch.zeros(8, dtype=torch.int64)
    )


@pytest.mark.parametrize("quantizer", ["fsq", "vq", "regvq", "lfq", "bsq", "simvq", "rfsq"])
def test_the_tokenizer_traces_as_one_graph_with_its_usage_statistics(quantizer):
    # bincount's data-dependent output size broke the graph inside every quantizer call (six or
    # seven breaks in a forward). The training forward after the first (VQ's k-means and RegVQ's
    # data initialisation) is one graph too, with VQ's dead-code restarts and RegVQ's stochastic
    # mask: 5 breaks each before they stopped reading counts back.
    config = TokenizerConfig(
        in_channels=1, image_size=16, base_channels=8, channel_multipliers=(1, 2), quantizer=quantizer,
        codebook_size=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Tokenizer(config)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    torch._dynamo.reset()
    assert torch._dynamo.explain(model.encode)(images).graph_break_count == 0
    assert torch._dynamo.explain(model.eval())(images).graph_break_count == 0
    model.train()(images)  # VQ and RegVQ initialise their codebooks here, once
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(images).graph_break_count == 0
