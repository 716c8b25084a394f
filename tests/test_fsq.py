"""Properties of FSQ: exact implicit codebook, straight-through gradients, balance, paper parity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtok.quantizers import FSQ, RegularizedVQ, VectorQuantizer

LEVEL_SETS = [[3], [2, 2], [8, 6, 5], [8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5], [2, 3, 4, 5]]


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_indices_codes_indices_is_identity_over_whole_codebook(levels, symmetric):
    fsq = FSQ(levels, symmetric=symmetric)
    indices = torch.arange(fsq.codebook_size).view(1, -1, 1)  # (1, K, 1) as a (B, H, W) grid
    codes = fsq.indices_to_codes(indices)
    assert codes.shape == (1, len(levels), fsq.codebook_size, 1)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    # and every code is distinct, inside [-1, 1]
    codebook = fsq.implicit_codebook
    assert codebook.shape == (fsq.codebook_size, len(levels))
    assert torch.unique(codebook, dim=0).shape[0] == fsq.codebook_size
    assert codebook.abs().max() <= 1.0


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_forward_codes_lie_on_grid_and_match_indices(levels, symmetric):
    fsq = FSQ(levels, symmetric=symmetric)
    z = torch.randn(4, len(levels), 6, 5) * 3
    codes, indices, loss, stats = fsq(z)
    assert codes.shape == z.shape and indices.shape == (4, 6, 5) and indices.dtype == torch.int64
    assert loss.item() == 0.0
    assert torch.equal(fsq.indices_to_codes(indices), codes)
    assert int(indices.min()) >= 0 and int(indices.max()) < fsq.codebook_size
    assert set(stats) >= {"perplexity", "usage"}
    assert 1.0 <= stats["perplexity"].item() <= fsq.codebook_size


def test_symmetric_even_levels_span_minus_one_to_one():
    assert FSQ([2]).implicit_codebook.flatten().tolist() == [-1.0, 1.0]
    assert FSQ([4]).implicit_codebook.flatten().tolist() == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])
    # the paper's bound for even L: integers {-L/2, ..., L/2 - 1} over L/2
    assert FSQ([4], symmetric=False).implicit_codebook.flatten().tolist() == [-1.0, -0.5, 0.0, 0.5]


@pytest.mark.parametrize("symmetric", [True, False])
def test_straight_through_gradients_are_finite_and_nonzero(symmetric):
    fsq = FSQ([8, 5, 5, 5], symmetric=symmetric)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    codes = fsq(z).codes
    (codes * torch.randn_like(codes)).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad != 0).float().mean() > 0.99


@pytest.mark.parametrize("levels", [[3], [5], [7], [5, 5, 3], [7, 5, 5, 5, 5], [9, 7]])
def test_odd_levels_match_vector_quantize_pytorch(levels):
    reference = pytest.importorskip("vector_quantize_pytorch").FSQ(levels=levels, channel_first=True)
    fsq = FSQ(levels)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(16, len(levels), 32, 32, generator=generator) * 2
    ours = fsq(z).indices
    _, theirs = reference(z)
    agree = ours == theirs.long()
    assert agree.float().mean() >= 0.99
    if not agree.all():
        # A disagreement can only be a value sitting on a rounding edge of the shared bound.
        bounded = fsq.bound(z).permute(0, 2, 3, 1)[~agree]  # (M, C)
        distance_to_edge = ((bounded - bounded.floor()) - 0.5).abs().min(dim=-1).values
        assert distance_to_edge.max() < 1e-4


@pytest.mark.parametrize("level", [2, 4])
def test_symmetric_even_levels_are_balanced_on_gaussian_latents(level):
    fsq = FSQ([level])
    z = torch.randn(1, 1, 1000, 1000, generator=torch.Generator().manual_seed(1))
    shares = torch.bincount(fsq(z).indices.flatten(), minlength=level).float() / z.numel()
    assert shares.min() > 0
    assert shares.max() <= 2 * shares.min(), shares.tolist()


def test_paper_bound_is_lopsided_for_two_levels():
    z = torch.randn(1, 1, 1000, 1000, generator=torch.Generator().manual_seed(2))
    shares = torch.bincount(FSQ([2], symmetric=False)(z).indices.flatten(), minlength=2).float() / z.numel()
    assert shares.max() > 0.99  # what the docstring states: ~99.99% on one level with the atanh shift


def test_levels_for_returns_table_one():
    assert FSQ.levels_for(2**8) == [8, 6, 5]
    assert FSQ.levels_for(2**10) == [8, 5, 5, 5]
    assert FSQ.levels_for(2**12) == [7, 5, 5, 5, 5]
    assert FSQ.levels_for(2**14) == [8, 8, 8, 6, 5]
    assert FSQ.levels_for(2**16) == [8, 8, 8, 5, 5, 5]
    for size in (2**8, 2**10, 2**12, 2**14, 2**16):
        fsq = FSQ(FSQ.levels_for(size))
        assert abs(fsq.codebook_size - size) / size < 0.1
    with pytest.raises(ValueError, match="codebook_size"):
        FSQ.levels_for(1000)


@pytest.mark.parametrize("symmetric", [True, False])
def test_bf16_autocast_gives_same_indices_and_exact_index_arithmetic(symmetric):
    fsq = FSQ([8, 8, 8, 5, 5, 5], symmetric=symmetric)
    z = torch.randn(8, 6, 16, 16) * 2
    reference = fsq(z)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = fsq(z)
        from_bf16_input = fsq(z.bfloat16())
    assert torch.equal(under_autocast.indices, reference.indices)
    assert under_autocast.codes.dtype == torch.float32
    assert from_bf16_input.codes.dtype == torch.bfloat16
    # codes stored in bf16 still map back to the exact indices
    assert torch.equal(fsq.codes_to_indices(reference.codes.bfloat16()), reference.indices)


def test_large_codebook_indices_round_trip_exactly():
    fsq = FSQ([8] * 10)  # 2^30 codes: far beyond float32's exact integer range
    indices = torch.tensor([0, 1, 2**24 + 1, 2**30 - 1, 987_654_321]).view(1, -1, 1)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(indices)), indices)


@settings(max_examples=40, deadline=None)
@given(
    levels=st.lists(st.integers(min_value=2, max_value=16), min_size=1, max_size=6),
    symmetric=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_random_indices_round_trip(levels, symmetric, seed):
    fsq = FSQ(levels, symmetric=symmetric)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, fsq.codebook_size, (2, 3, 4), generator=generator)
    codes = fsq.indices_to_codes(indices)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    # the latent that the bound maps exactly onto each code quantizes back to that code
    level_values = codes * fsq._scale
    preimage = torch.atanh((level_values + fsq._offset) / fsq._half_l) - fsq._shift
    assert torch.equal(fsq(preimage).indices, indices)


def test_noise_is_off_by_default_and_dithers_within_the_bin_when_on():
    z = torch.randn(4, 3, 8, 8)
    plain = FSQ([8, 5, 5]).train()
    assert torch.equal(plain(z).codes, plain.indices_to_codes(plain(z).indices))

    noisy = FSQ([8, 5, 5], noise_prob=1.0).train()
    out = noisy(z)
    grid_codes = noisy.indices_to_codes(out.indices)
    half_bin = 0.5 / noisy._scale
    assert not torch.equal(out.codes, grid_codes)
    assert ((out.codes - grid_codes).abs() <= half_bin + 1e-6).all()
    assert torch.equal(out.indices, plain(z).indices)  # indices ignore the noise
    noisy.eval()
    assert torch.equal(noisy(z).codes, grid_codes)


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ([], "non-empty"),
        ([8, 1], r"levels\[1\]"),
        ([0], r"levels\[0\]"),
        ([5, 2.5], r"levels\[1\]"),
        ([5, 5.0], r"levels\[1\]"),
        (["8"], r"levels\[0\]"),
        ([True, 3], r"levels\[0\]"),
        ("855", "levels"),
        (8, "levels"),
        ([5, 1002], r"levels\[1\]: 1002 levels in one channel; at most 1001"),
    ],
)
def test_bad_levels_raise_value_error_naming_the_argument(levels, message):
    with pytest.raises(ValueError, match=message):
        FSQ(levels)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("level", [2, 999, 1000, 1001])
def test_saturated_latents_land_on_the_outermost_levels_up_to_the_largest_level_count(level, symmetric):
    quantizer = FSQ([level, 3], symmetric=symmetric, fused=False).eval()
    z = torch.tensor([-1e4, -30.0, -9.0, 0.0, 9.0, 30.0, 1e4]).view(1, 1, 1, -1).expand(1, 2, 1, -1)
    out = quantizer(z.contiguous())
    digits = out.indices.flatten() % level
    assert digits.tolist()[:2] == [0, 0] and digits.tolist()[-2:] == [level - 1, level - 1]
    assert out.codes.abs().max() <= 1.0
    assert torch.equal(quantizer.indices_to_codes(out.indices), out.codes)


def test_codes_too_coarse_for_their_levels_are_refused_rather_than_misread():
    for level, refused in [(513, False), (514, True)]:
        quantizer = FSQ([level, 2])
        indices = torch.arange(quantizer.codebook_size).view(1, 1, -1)
        codes = quantizer.indices_to_codes(indices)
        assert torch.equal(quantizer.codes_to_indices(codes.half()), indices)  # float16 holds 1001 levels
        if refused:
            with pytest.raises(ValueError, match=r"codes: torch.bfloat16 cannot tell apart the 514 levels"):
                quantizer.codes_to_indices(codes.bfloat16())
        else:
            assert torch.equal(quantizer.codes_to_indices(codes.bfloat16()), indices)


def test_mismatched_channels_and_bad_noise_raise_value_error():
    with pytest.raises(ValueError, match=r"z: latent has 4 channels but the quantizer expects 3"):
        FSQ([8, 5, 5])(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"z: expected latents of shape \(B, C, H, W\)"):
        FSQ([8, 5, 5])(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="noise_prob"):
        FSQ([8, 5, 5], noise_prob=1.5)
    with pytest.raises(ValueError, match="indices"):
        FSQ([8, 5, 5]).indices_to_codes(torch.zeros(2, 3))


@pytest.mark.parametrize(
    "make", [lambda: FSQ([5, 3]), lambda: VectorQuantizer(15, 4), lambda: RegularizedVQ(15, 4)]
)
@pytest.mark.parametrize("bad", [-1, 15])
def test_every_quantizer_rejects_indices_outside_the_codebook(make, bad):
    quantizer = make()
    indices = torch.zeros(1, 2, 2, dtype=torch.long)
    indices[0, 1, 1] = bad
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 15\)"):
        quantizer.indices_to_codes(indices)
    indices[0, 1, 1] = 14
    assert quantizer.indices_to_codes(indices).shape == (1, quantizer.dim, 2, 2)


def reference_indices(fsq: FSQ, z: torch.Tensor) -> torch.Tensor:
    """Indices by the definition: each channel's digit (level index) weighted by its mixed-radix basis,
    summed in int64."""
    rounded = fsq._round_to_levels(fsq.bound(z))
    digits = (torch.nan_to_num(rounded, nan=0.0) + fsq._scale).long()
    return (digits * fsq._basis).sum(dim=1)


@pytest.mark.parametrize("levels", [*LEVEL_SETS, [8] * 8, [8] * 10])  # 2^24 and 2^30 codes: int64 path
@pytest.mark.parametrize("symmetric", [True, False])
def test_inference_path_matches_the_training_path_bit_for_bit(levels, symmetric):
    """Without a gradient FSQ quantizes in place and sums indices in float32 (the fast CPU path); codes
    and indices must equal those of the autograd path and the int64 definition exactly, NaN included."""
    fsq = FSQ(levels, symmetric=symmetric, fused=False)
    z = torch.randn(3, len(levels), 9, 7) * 3
    z[0, 0, 0, 0] = float("nan")
    z[1, -1, 2, 3] = 40.0  # saturated: the outermost level
    trained_codes, trained_indices = fsq.quantize(z.clone().requires_grad_(True))
    with torch.no_grad():
        codes, indices = fsq.quantize(z)
    assert torch.equal(indices, trained_indices)
    assert torch.equal(indices, reference_indices(fsq, z))
    assert torch.equal(codes.nan_to_num(9.0), trained_codes.detach().nan_to_num(9.0))
    assert torch.isnan(codes[0, :, 0, 0]).any() and 0 <= int(indices[0, 0, 0]) < fsq.codebook_size
