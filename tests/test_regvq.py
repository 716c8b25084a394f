"""Properties of Regularized VQ: prior KL, stochastic masking, contrastive-loss weights, gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtok.quantizers.regvq import TENSOR_STATS, RegularizedVQ, pcl_weights, prior_kl


def separated_quantizer(codebook_size: int, spacing: float = 10.0, **kwargs) -> RegularizedVQ:
    """A quantizer whose codes are ``spacing`` times the unit vectors, so dim == codebook_size."""
    quantizer = RegularizedVQ(codebook_size, codebook_size, data_init=False, **kwargs)
    with torch.no_grad():
        quantizer.codebook.copy_(spacing * torch.eye(codebook_size))
    return quantizer


def latents_at(quantizer: RegularizedVQ, indices: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """Latents (B, C, H, W) sitting at the codes ``indices`` (B, H, W), plus optional Gaussian noise."""
    z = quantizer.indices_to_codes(indices).detach().clone()
    return z + noise * torch.randn_like(z)


def binomial_tolerance(p: float, n: int, sigmas: float = 5.0) -> float:
    """Allowed deviation of an observed fraction from p over n independent trials."""
    return sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


# ---------------------------------------------------------------------------------------------------
# prior_kl


@pytest.mark.parametrize("k", [2, 7, 64, 1024])
def test_prior_kl_is_zero_for_uniform_assignments(k):
    soft = torch.full((5, k), 1.0 / k)  # every position spreads evenly
    hard = torch.eye(k).repeat(3, 1)  # every code chosen equally often, one-hot rows
    assert prior_kl(soft).item() == pytest.approx(0.0, abs=1e-5)
    assert prior_kl(hard).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("k", [2, 7, 64, 1024])
@pytest.mark.parametrize("code", [0, -1])
def test_prior_kl_is_log_k_when_every_vector_picks_one_code(k, code):
    probs = torch.zeros(11, k)
    probs[:, code] = 1.0
    assert prior_kl(probs).item() == pytest.approx(math.log(k), rel=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 20),
    k=st.integers(2, 40),
    scale=st.floats(0.0, 30.0),
    seed=st.integers(0, 2**16),
)
def test_prior_kl_equals_log_k_minus_entropy_of_the_mean_and_stays_in_range(n, k, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = (scale * torch.randn(n, k, generator=gen, dtype=torch.float64)).softmax(dim=1)
    mean = probs.mean(dim=0)
    entropy = -(mean * mean.clamp_min(1e-300).log()).sum()
    kl = prior_kl(probs)
    assert kl.item() == pytest.approx((math.log(k) - entropy).item(), abs=1e-9)
    assert -1e-9 <= kl.item() <= math.log(k) + 1e-9


def test_prior_kl_averages_over_all_leading_dimensions():
    probs = torch.randn(2, 3, 4, 5).softmax(dim=-1)
    assert torch.allclose(prior_kl(probs), prior_kl(probs.reshape(-1, 5)))


@pytest.mark.parametrize("k", [3, 16])
def test_module_prior_kl_is_log_k_when_all_latents_sit_on_one_code(k):
    quantizer = separated_quantizer(k).eval()
    z = latents_at(quantizer, torch.zeros(2, 4, 4, dtype=torch.long))
    out = quantizer(z)
    assert out.stats["prior_kl"].item() == pytest.approx(math.log(k), rel=1e-4)


@pytest.mark.parametrize("k", [3, 16])
def test_module_prior_kl_is_zero_when_latents_cover_all_codes_evenly(k):
    quantizer = separated_quantizer(k).eval()
    z = latents_at(quantizer, torch.arange(k).repeat(4).view(2, 2, k))
    out = quantizer(z)
    assert out.stats["prior_kl"].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("prior_weight", [0.0, 0.1, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_loss_is_codebook_plus_commitment_plus_weighted_kl(prior_weight, beta):
    torch.manual_seed(0)
    quantizer = RegularizedVQ(32, 4, beta=beta, prior_weight=prior_weight)
    out = quantizer(torch.randn(2, 4, 5, 5))
    stats = out.stats
    expected = stats["codebook_loss"] + beta * stats["commitment"] + prior_weight * stats["prior_kl"]
    assert out.loss.ndim == 0
    assert torch.allclose(out.loss, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# stochastic mask


@pytest.mark.parametrize("mask_ratio", [0.0, 0.1, 0.4, 0.75, 1.0])
def test_sampled_fraction_matches_mask_ratio(mask_ratio):
    torch.manual_seed(1)
    quantizer = RegularizedVQ(16, 3, mask_ratio=mask_ratio).train()
    out = quantizer(torch.randn(4, 3, 32, 32))  # 4096 positions
    mask = out.stats["sample_mask"]
    fraction = out.stats["sampled_fraction"].item()
    assert mask.dtype == torch.bool and mask.shape == (4, 32, 32)
    assert fraction == pytest.approx(mask.float().mean().item())
    assert mask.sum().item() == round(mask_ratio * mask.numel())  # exactly the ratio, not about it
    # Outside the mask the code is always the nearest one.
    assert torch.equal(out.indices[~mask], out.stats["argmax_indices"][~mask])


def test_mask_positions_differ_between_training_calls():
    torch.manual_seed(2)
    quantizer = RegularizedVQ(8, 2, mask_ratio=0.5).train()
    z = torch.randn(1, 2, 16, 16)
    first, second = quantizer(z).stats["sample_mask"], quantizer(z).stats["sample_mask"]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.4, 1.0])
def test_eval_mode_is_deterministic_argmax_and_samples_nothing(mask_ratio):
    torch.manual_seed(3)
    quantizer = RegularizedVQ(64, 6, mask_ratio=mask_ratio, gumbel_temperature=5.0).eval()
    with torch.no_grad():
        quantizer.codebook.normal_()
    z = torch.randn(3, 6, 7, 5)
    first, second = quantizer(z), quantizer(z)
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.indices, first.stats["argmax_indices"])
    flat = z.permute(0, 2, 3, 1).reshape(-1, 6).double()
    distances = torch.cdist(flat, quantizer.codebook.detach().double())  # (N, K)
    assert torch.equal(first.indices.reshape(-1), distances.argmin(dim=1))
    assert not first.stats["sample_mask"].any()
    assert first.stats["sampled_fraction"].item() == 0.0
    assert torch.all(first.stats["pcl_weights"] == 0)


def test_sampled_codes_match_argmax_for_a_peaked_posterior_and_low_gumbel_temperature():
    torch.manual_seed(4)
    quantizer = separated_quantizer(8, mask_ratio=1.0, gumbel_temperature=1e-3).train()
    z = latents_at(quantizer, torch.randint(8, (4, 16, 16)), noise=0.5)
    out = quantizer(z)
    assert out.stats["sample_mask"].all()
    agreement = (out.indices == out.stats["argmax_indices"]).float().mean().item()
    assert agreement > 0.99


@pytest.mark.parametrize("k", [4, 16])
def test_samples_spread_over_all_codes_for_a_flat_posterior(k):
    torch.manual_seed(5)
    quantizer = separated_quantizer(k, mask_ratio=1.0, prior_temperature=1e6).train()
    z = latents_at(quantizer, torch.zeros(8, 32, 32, dtype=torch.long))  # all nearest to code 0
    out = quantizer(z)
    n = out.indices.numel()
    frequencies = torch.bincount(out.indices.reshape(-1), minlength=k).float() / n
    assert torch.all((frequencies - 1.0 / k).abs() <= binomial_tolerance(1.0 / k, n))
    assert out.stats["usage"].item() == 1.0


@pytest.mark.parametrize("gumbel_temperature", [0.1, 1.0, 10.0])
def test_sample_frequencies_follow_the_posterior_whatever_the_gumbel_temperature(gumbel_temperature):
    torch.manual_seed(6)
    k, dim = 5, 3
    quantizer = RegularizedVQ(
        k, dim, mask_ratio=1.0, prior_temperature=2.0, gumbel_temperature=gumbel_temperature
    ).train()
    with torch.no_grad():
        quantizer.codebook.normal_()
    latent = torch.randn(dim)
    z = latent.view(1, dim, 1, 1).expand(16, dim, 32, 32).contiguous()  # one latent, 16384 draws
    out = quantizer(z)
    n = out.indices.numel()
    posterior = (-(latent - quantizer.codebook.detach()).pow(2).sum(dim=1) / 2.0).softmax(dim=0)
    frequencies = torch.bincount(out.indices.reshape(-1), minlength=k).float() / n
    for code in range(k):
        p = posterior[code].item()
        assert abs(frequencies[code].item() - p) <= binomial_tolerance(p, n)


# ---------------------------------------------------------------------------------------------------
# contrastive-loss weights


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 64), d=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_pcl_weights_sum_to_one_on_sampled_positions_and_are_proportional(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    sampled = torch.randn(n, d, generator=gen)
    argmax = torch.randn(n, d, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.5
    mask[0] = True
    weights = pcl_weights(sampled, argmax, mask)
    distances = (sampled - argmax).pow(2).sum(dim=1)
    assert weights.shape == (n,)
    assert torch.all(weights[~mask] == 0)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    expected = distances * mask / (distances * mask).sum()
    assert torch.allclose(weights, expected, rtol=1e-5, atol=1e-7)


def test_pcl_weights_are_uniform_over_sampled_positions_when_every_sample_is_the_argmax():
    codes = torch.randn(10, 4)
    mask = torch.tensor([True, False, True, True, False, False, False, True, False, False])
    weights = pcl_weights(codes, codes.clone(), mask)
    assert torch.equal(weights, mask.float() / 4)


def test_pcl_weights_are_zero_when_nothing_is_sampled():
    weights = pcl_weights(torch.randn(6, 3), torch.randn(6, 3), torch.zeros(6, dtype=torch.bool))
    assert torch.equal(weights, torch.zeros(6))


def test_pcl_weights_keep_the_leading_shape():
    weights = pcl_weights(
        torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.ones(2, 3, 4, dtype=torch.bool)
    )
    assert weights.shape == (2, 3, 4)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mask_ratio", [0.3, 1.0])
def test_module_pcl_weights_follow_the_distance_between_sampled_and_argmax_codes(mask_ratio):
    torch.manual_seed(7)
    quantizer = RegularizedVQ(16, 4, mask_ratio=mask_ratio, prior_temperature=50.0).train()
    with torch.no_grad():
        quantizer.codebook.normal_()
    out = quantizer(torch.randn(2, 4, 16, 16))
    mask, weights = out.stats["sample_mask"], out.stats["pcl_weights"]
    assert weights.shape == mask.shape == (2, 16, 16) and weights.dtype == torch.float32
    assert not weights.requires_grad
    assert torch.all(weights[~mask] == 0)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    codebook = quantizer.codebook.detach()
    distances = (codebook[out.indices] - codebook[out.stats["argmax_indices"]]).pow(2).sum(dim=-1)
    expected = distances * mask / (distances * mask).sum()
    assert torch.allclose(weights, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# gradients, shapes, dtypes


@pytest.mark.parametrize("mask_ratio", [0.0, 0.4, 1.0])
def test_gradients_reach_encoder_and_codebook_and_are_finite(mask_ratio):
    torch.manual_seed(8)
    quantizer = RegularizedVQ(32, 4, mask_ratio=mask_ratio).train()
    z = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = quantizer(z)
    (out.loss + (out.codes * torch.randn_like(out.codes)).sum()).backward()
    for grad in (z.grad, quantizer.codebook.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_straight_through_passes_the_decoder_gradient_unchanged_to_the_encoder_without_sampling():
    quantizer = RegularizedVQ(32, 4, mask_ratio=0.0).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    (quantizer(z).codes * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)
    # Without sampling the decoder's loss reaches the codebook only through the codebook loss.
    assert quantizer.codebook.grad is None or torch.all(quantizer.codebook.grad == 0)


def test_gumbel_straight_through_lets_the_decoder_loss_reach_the_codebook_on_sampled_positions():
    torch.manual_seed(9)
    quantizer = RegularizedVQ(32, 4, mask_ratio=1.0).train()
    with torch.no_grad():
        quantizer.codebook.normal_()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    (quantizer(z).codes * torch.randn(2, 4, 3, 3)).sum().backward()
    grad = quantizer.codebook.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_prior_kl_gradient_alone_is_finite_even_for_unused_codes():
    quantizer = separated_quantizer(8, prior_weight=1.0, beta=0.0).eval()
    z = latents_at(quantizer, torch.zeros(1, 2, 2, dtype=torch.long)).requires_grad_(True)
    quantizer(z).loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(quantizer.codebook.grad).all()


@pytest.mark.parametrize(
    ("batch", "dim", "height", "width", "k"), [(1, 1, 1, 1, 2), (2, 3, 4, 5, 17), (3, 8, 8, 8, 512)]
)
@pytest.mark.parametrize("training", [False, True])
def test_shapes_dtypes_and_codes_match_indices(batch, dim, height, width, k, training):
    torch.manual_seed(10)
    quantizer = RegularizedVQ(k, dim).train(training)
    out = quantizer(torch.randn(batch, dim, height, width))
    assert quantizer.codebook_size == k
    assert out.codes.shape == (batch, dim, height, width) and out.codes.dtype == torch.float32
    assert out.indices.shape == (batch, height, width) and out.indices.dtype == torch.int64
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.all((out.indices >= 0) & (out.indices < k))
    assert torch.allclose(out.codes, quantizer.indices_to_codes(out.indices), atol=1e-6)
    assert set(TENSOR_STATS) <= out.stats.keys()
    for key, value in out.stats.items():
        if key in TENSOR_STATS:
            assert value.shape == (batch, height, width)
        else:
            assert value.ndim == 0 and torch.isfinite(value)
    assert out.stats["argmax_indices"].dtype == torch.int64
    assert 0 < out.stats["usage"].item() <= 1
    assert 1 <= out.stats["perplexity"].item() <= k + 1e-4


def test_bf16_autocast_gives_the_same_argmax_indices_as_float32():
    torch.manual_seed(11)
    quantizer = RegularizedVQ(256, 8).eval()
    with torch.no_grad():
        quantizer.codebook.normal_()
    z = torch.randn(2, 8, 12, 12)
    reference = quantizer(z)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = quantizer(z)
    assert torch.equal(autocast.indices, reference.indices)
    assert torch.equal(autocast.stats["argmax_indices"], reference.stats["argmax_indices"])
    assert autocast.codes.dtype == torch.float32
    assert torch.equal(autocast.codes, reference.codes)


def test_bf16_input_gives_bf16_codes():
    quantizer = RegularizedVQ(16, 4).train()
    out = quantizer(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16))
    assert out.codes.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"codebook_size": 1}, "codebook_size"),
        ({"codebook_size": 0}, "codebook_size"),
        ({"dim": 0}, "dim"),
        ({"mask_ratio": -0.1}, "mask_ratio"),
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"prior_temperature": 0.0}, "prior_temperature"),
        ({"prior_temperature": -1.0}, "prior_temperature"),
        ({"gumbel_temperature": 0.0}, "gumbel_temperature"),
        ({"gumbel_temperature": -2.0}, "gumbel_temperature"),
        ({"beta": -0.25}, "beta"),
        ({"prior_weight": -1.0}, "prior_weight"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_argument(kwargs, name):
    arguments = {"codebook_size": 16, "dim": 4, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        RegularizedVQ(**arguments)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 4, 4), (4, 4)])
def test_forward_rejects_latents_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match="z:"):
        RegularizedVQ(16, 4)(torch.randn(*shape))


@pytest.mark.parametrize("indices", [torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 2, 2)])
def test_indices_to_codes_rejects_bad_indices(indices):
    with pytest.raises(ValueError, match="indices:"):
        RegularizedVQ(16, 4).indices_to_codes(indices)


def test_first_training_batch_seeds_the_codebook_with_its_latents():
    quantizer = RegularizedVQ(64, 4).train()
    z = torch.randn(2, 4, 8, 8) * 3 + 5  # far from the (-1/K, 1/K) start
    quantizer(z)
    latents = z.permute(0, 2, 3, 1).reshape(-1, 4)
    is_latent = (quantizer.codebook.detach()[:, None, :] == latents[None]).all(dim=-1)  # (K, N)
    assert is_latent.any(dim=1).all()  # every code is one of the batch's latents
    assert bool(quantizer.initialized)
    seeded = quantizer.codebook.detach().clone()
    quantizer(torch.randn(2, 4, 8, 8))
    assert torch.equal(quantizer.codebook.detach(), seeded)  # only the first batch seeds
    reloaded = RegularizedVQ(64, 4)
    reloaded.load_state_dict(quantizer.state_dict())
    assert bool(reloaded.initialized)
    reloaded.train()(torch.randn(2, 4, 8, 8) - 40)
    assert reloaded.codebook.detach().mean() > 0  # seeded by the loaded state, not seeded again
    quantizer.load_state_dict(RegularizedVQ(64, 4).state_dict())  # an unseeded state: seed again
    quantizer(torch.randn(2, 4, 8, 8) - 40)
    assert bool(quantizer.initialized) and quantizer.codebook.detach().mean() < -30


def test_data_init_uses_every_code_on_the_seeding_batch():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(8, 8, 16, 16, generator=generator)
    usage = {}
    for data_init in (True, False):
        torch.manual_seed(0)
        quantizer = RegularizedVQ(256, 8, data_init=data_init).train()
        quantizer(z)
        usage[data_init] = quantizer.eval()(z).stats["usage"].item()
    assert usage[True] == 1.0  # each code is a latent of z, so it is that latent's nearest code
    assert usage[True] > usage[False]


# ---------------------------------------------------------------------------------------------------
# torch.distributed: two CPU processes with the gloo backend

DDP_WORLD_SIZE = 2


def ddp_latents(rank: int) -> torch.Tensor:
    """Each rank's half of one batch, from different regions, so its own assignments are lopsided."""
    generator = torch.Generator().manual_seed(17 + rank)
    return torch.randn(2, 4, 3, 3, generator=generator) + (3.0 if rank == 0 else -3.0)


def regvq_ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from conftest import join_gloo

    torch.set_num_threads(1)
    join_gloo(rank, DDP_WORLD_SIZE, port)
    try:
        torch.manual_seed(0)  # the same codebook on both ranks, as DDP's first broadcast makes it
        quantizer = RegularizedVQ(8, 4, mask_ratio=0.0, data_init=False, prior_weight=1.0).train()
        z = ddp_latents(rank).requires_grad_()
        out = quantizer(z)
        out.loss.backward()
        # The all-reduce is traced into a compiled step's graph, not a break in it.
        torch._dynamo.reset()
        breaks = torch._dynamo.explain(quantizer)(z.detach()).graph_break_count
        eval_kl = quantizer.eval()(z.detach()).stats["prior_kl"]  # eval mode: this rank's batch alone
        torch.save(
            {
                "kl": out.stats["prior_kl"],
                "eval_kl": eval_kl,
                "breaks": breaks,
                "codebook_grad": quantizer.codebook.grad,
                "z_grad": z.grad,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_distributed_prior_kl_and_its_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    from conftest import free_port, spawn_ranks

    spawn_ranks(regvq_ddp_worker, DDP_WORLD_SIZE, free_port(), str(tmp_path), limit_s=90)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(DDP_WORLD_SIZE)]

    torch.manual_seed(0)
    single = RegularizedVQ(8, 4, mask_ratio=0.0, data_init=False, prior_weight=1.0).train()
    z = torch.cat([ddp_latents(rank) for rank in range(DDP_WORLD_SIZE)]).requires_grad_()
    out = single(z)
    out.loss.backward()

    assert [result["breaks"] for result in ranks] == [0] * DDP_WORLD_SIZE
    # Every rank's KL is the KL of the whole batch's mean assignment, not of its own half.
    for result in ranks:
        assert torch.allclose(result["kl"], out.stats["prior_kl"], atol=1e-6)
    own = [float(result["eval_kl"]) for result in ranks]
    assert min(own) > float(out.stats["prior_kl"]) + 0.1  # each half alone is far more lopsided
    # DDP averages the ranks' parameter gradients: that average is the one-process gradient.
    mean_grad = torch.stack([result["codebook_grad"] for result in ranks]).mean(dim=0)
    assert torch.allclose(mean_grad, single.codebook.grad, atol=1e-5)
    # A rank's loss averages over its half, so its input gradient is world_size times its share.
    halves = z.grad.chunk(DDP_WORLD_SIZE)
    for result, half in zip(ranks, halves, strict=True):
        assert torch.allclose(result["z_grad"] / DDP_WORLD_SIZE, half, atol=1e-6)
