"""LFQ and BSQ: indices and codes equal vector-quantize-pytorch's LFQ (and its spherical variant) on the
same inputs, the entropy loss equals a hand computation over every code and the peer's, round trips,
bad options named, fp32 under bf16 autocast, and the codebook entropy of two gloo ranks equal to one
process's on the whole batch."""

from __future__ import annotations

import math

import pytest
import torch

from imtok.quantizers import BSQ, LFQ
from imtok.quantizers.lfq import (
    binary_entropy,
    bit_probabilities,
    code_bits,
    code_probabilities,
    code_probability_sums,
    entropy_terms,
)

KINDS = {"lfq": LFQ, "bsq": BSQ}


def peer(dim: int, spherical: bool, **options):
    from vector_quantize_pytorch import LFQ as PeerLFQ

    return PeerLFQ(dim=dim, codebook_size=2**dim, channel_first=True, spherical=spherical, **options)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [1, 4, 10, 14])
def test_indices_and_codes_equal_the_peer_on_the_same_inputs(kind, dim):
    torch.manual_seed(dim)
    z = torch.randn(3, dim, 5, 4)
    ours = KINDS[kind](dim).eval()
    theirs = peer(dim, spherical=kind == "bsq").eval()
    out = ours(z)
    with torch.no_grad():
        codes, indices, _ = theirs(z)
    assert torch.equal(out.indices, indices.long())
    assert torch.allclose(out.codes, codes, atol=1e-6)
    assert out.indices.shape == (3, 5, 4) and out.indices.dtype == torch.int64


@pytest.mark.parametrize("kind", KINDS)
def test_codes_indices_codes_round_trip_over_the_whole_codebook(kind):
    quantizer = KINDS[kind](6).eval()
    indices = torch.arange(64).view(1, 8, 8)
    codes = quantizer.indices_to_codes(indices)
    assert codes.shape == (1, 6, 8, 8)
    assert torch.equal(quantizer(codes).indices, indices)
    norms = codes.norm(dim=1)
    expected = 1.0 if kind == "bsq" else math.sqrt(6)
    assert torch.allclose(norms, torch.full_like(norms, expected))


def hand_entropies(x: torch.Tensor, scale: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two entropies by enumeration: q(c | x) = softmax_c(-tau ||x - c||^2) over all 2^d codes."""
    codes = (code_bits(x.shape[1]) * 2 - 1) * scale  # (K, d)
    q = torch.softmax(-tau * torch.cdist(x.double(), codes.double()).pow(2), dim=1)  # (N, K)
    per_sample = -(q * q.clamp_min(1e-30).log()).sum(1).mean()
    mean = q.mean(0)
    return per_sample, -(mean * mean.clamp_min(1e-30).log()).sum()


@pytest.mark.parametrize("kind", KINDS)
def test_the_entropy_terms_equal_a_hand_computation_over_every_code(kind):
    torch.manual_seed(0)
    dim, tau = 5, 2.0  # a soft assignment, so both entropies are far from 0
    quantizer = KINDS[kind](dim, inv_temperature=tau, exact_entropy=True)
    x = quantizer.project(torch.randn(40, dim, 1, 1)).flatten(1)
    per_sample, batch = entropy_terms(
        bit_probabilities(x, quantizer.scale, tau), exact=True, across_ranks=False
    )
    hand_per_sample, hand_batch = hand_entropies(x, quantizer.scale, tau)
    assert per_sample.item() == pytest.approx(hand_per_sample.item(), rel=1e-5)
    assert batch.item() == pytest.approx(hand_batch.item(), rel=1e-5)
    # the factorised codebook entropy (large codebooks) bounds the exact one from above
    _, factorised = entropy_terms(bit_probabilities(x, quantizer.scale, tau), exact=False, across_ranks=False)
    assert factorised.item() >= batch.item() - 1e-6


@pytest.mark.parametrize("dim", [1, 2, 5, 8])
def test_the_code_sums_from_two_halves_equal_the_full_code_matrix_and_its_gradient(dim):
    torch.manual_seed(dim)
    x = torch.randn(30, dim, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2**dim, dtype=torch.float64)  # a loss that weighs every code differently
    full = code_probabilities(torch.sigmoid(x)).sum(dim=0)
    (full_grad,) = torch.autograd.grad((full * weights).sum(), x)
    halves = code_probability_sums(torch.sigmoid(x))
    (halves_grad,) = torch.autograd.grad((halves * weights).sum(), x)
    torch.testing.assert_close(halves, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(halves_grad, full_grad, rtol=1e-10, atol=1e-12)
    assert halves.sum().item() == pytest.approx(30.0)  # every row is a distribution over the codes


@pytest.mark.parametrize("kind", KINDS)
def test_the_training_loss_equals_the_peers_entropy_loss(kind):
    torch.manual_seed(1)
    dim = 6
    z = torch.randn(4, dim, 3, 3)
    ours = KINDS[kind](dim, entropy_weight=1.0, commitment_weight=0.0, inv_temperature=3.0).train()
    theirs = peer(dim, spherical=kind == "bsq", entropy_loss_weight=1.0, commitment_loss_weight=0.0).train()
    _, _, peer_loss = theirs(z, inv_temperature=3.0)
    out = ours(z)
    assert out.loss.item() == pytest.approx(peer_loss.item(), rel=1e-4, abs=1e-6)
    assert out.stats["per_sample_entropy"] - out.stats["codebook_entropy"] == pytest.approx(out.loss.item())


@pytest.mark.parametrize("kind", KINDS)
def test_straight_through_gradients_reach_the_latents_and_nothing_is_nan(kind):
    z = (torch.randn(2, 8, 4, 4) * 3).requires_grad_()
    out = KINDS[kind](8).train()(z)
    (out.codes.square().mean() + out.loss).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert torch.isfinite(out.loss) and all(torch.isfinite(value).all() for value in out.stats.values())


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_quantizes_in_fp32(kind):
    z = torch.randn(2, 7, 3, 3)
    quantizer = KINDS[kind](7).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = quantizer(z.bfloat16())
    assert torch.equal(under.indices, quantizer(z.bfloat16().float()).indices)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"dim": 0}, "dim"),
        ({"dim": 25}, "dim"),
        ({"dim": 4, "entropy_weight": -1.0}, "entropy_weight"),
        ({"dim": 4, "inv_temperature": 0.0}, "inv_temperature"),
        ({"dim": 4, "exact_entropy": "yes"}, "exact_entropy"),
    ],
)
def test_bad_options_raise_value_error_naming_them(options, named):
    with pytest.raises(ValueError, match=named):
        LFQ(**options)
    with pytest.raises(ValueError, match="z: latent has 3 channels"):
        LFQ(4)(torch.zeros(1, 3, 2, 2))


def test_binary_entropy_is_log_two_at_one_half_and_zero_at_the_ends():
    values = binary_entropy(torch.tensor([0.5, 0.0, 1.0]))
    assert values[0].item() == pytest.approx(math.log(2)) and values[1:].abs().max() < 1e-9


WORLD = 2


def ranks_latents(rank: int) -> torch.Tensor:
    """Each rank's half of one batch, from different regions, so its own code distribution is lopsided."""
    return torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5 + rank)) + (
        1.0 if rank else -1.0
    )


def lfq_ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from conftest import join_gloo

    torch.set_num_threads(1)
    join_gloo(rank, WORLD, port)
    try:
        z = ranks_latents(rank).requires_grad_()
        out = LFQ(4, inv_temperature=1.0, commitment_weight=0.0).train()(z)
        out.loss.backward()
        torch.save({"entropy": out.stats["codebook_entropy"], "grad": z.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_compute_the_codebook_entropy_of_the_whole_batch(tmp_path):
    from conftest import free_port, spawn_ranks

    spawn_ranks(lfq_ddp_worker, WORLD, free_port(), str(tmp_path), limit_s=90)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    z = torch.cat([ranks_latents(rank) for rank in range(WORLD)]).requires_grad_()
    single = LFQ(4, inv_temperature=1.0, commitment_weight=0.0).train()(z)
    single.loss.backward()
    own = (
        LFQ(4, inv_temperature=1.0, commitment_weight=0.0).train()(ranks_latents(0)).stats["codebook_entropy"]
    )
    for result in ranks:
        assert torch.allclose(result["entropy"], single.stats["codebook_entropy"], atol=1e-6)
    assert not torch.allclose(own, single.stats["codebook_entropy"], atol=1e-3)  # a rank's half differs
    # with DDP's gradient averaging (mean over ranks) each rank's gradient is one process's on the batch
    averaged = torch.cat([result["grad"] for result in ranks]) / WORLD
    assert torch.allclose(averaged, z.grad, atol=1e-6)
