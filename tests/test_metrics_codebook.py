"""Codebook usage and perplexity over an evaluation set, from a known multiset of indices."""

import math

import pytest
import torch

from imtok.metrics.codebook import CodeCounter, code_perplexity, codebook_usage
from imtok.quantizers.common import code_histogram, codebook_stats


def test_known_multiset():
    # ids 0, 0, 1, 3 in a codebook of 8: three codes used, with p = (1/2, 1/4, 1/4)
    counts = code_histogram(torch.tensor([0, 0, 1, 3]), 8)
    assert codebook_usage(counts) == pytest.approx(3 / 8)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert code_perplexity(counts) == pytest.approx(math.exp(entropy))  # 2^1.5 = 2.83


def test_uniform_and_single_code_extremes():
    assert code_perplexity(torch.ones(16)) == pytest.approx(16)
    assert codebook_usage(torch.ones(16)) == 1.0
    single = torch.zeros(16)
    single[5] = 100
    assert code_perplexity(single) == pytest.approx(1.0)
    assert codebook_usage(single) == pytest.approx(1 / 16)
    assert math.isnan(code_perplexity(torch.zeros(4)))


def test_counter_accumulates_over_batches_not_per_batch():
    counter = CodeCounter(8)
    counter.update(torch.tensor([[[0, 1], [0, 1]]]))  # (1, 2, 2): codes 0 and 1
    counter.update(torch.tensor([[[2, 3], [2, 3]]]))  # codes 2 and 3
    assert counter.counts.tolist() == [2, 2, 2, 2, 0, 0, 0, 0]
    assert counter.total == 8
    # each batch alone uses 2 / 8 codes; the evaluation set uses 4 / 8
    assert counter.usage() == pytest.approx(0.5)
    assert counter.perplexity() == pytest.approx(4.0)
    assert counter.stats() == {"usage": 0.5, "perplexity": pytest.approx(4.0), "codes_used": 4.0}


def test_counter_agrees_with_the_quantizers_batch_stats():
    indices = torch.randint(0, 64, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    counter = CodeCounter(64)
    counter.update(indices)
    batch = codebook_stats(indices, 64)
    assert counter.usage() == pytest.approx(float(batch["usage"]))
    assert counter.perplexity() == pytest.approx(float(batch["perplexity"]), rel=1e-5)


def test_counter_ignores_empty_batches():
    counter = CodeCounter(4)
    counter.update(torch.zeros(0, 2, 2, dtype=torch.int64))
    assert counter.total == 0


def test_bad_inputs_raise():
    counter = CodeCounter(4)
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 4\)"):
        counter.update(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 4\)"):
        counter.update(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="integer"):
        counter.update(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="codebook_size"):
        CodeCounter(0)
    with pytest.raises(ValueError, match="counts: expected a 1-D"):
        codebook_usage(torch.ones(2, 2))
    with pytest.raises(ValueError, match="negative"):
        code_perplexity(torch.tensor([1.0, -1.0]))
