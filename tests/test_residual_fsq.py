"""Residual FSQ: indices, codes and gradients equal vector-quantize-pytorch's ResidualFSQ, codes ->
indices -> codes round trips, each stage refines the last, the token layout round trips through the
tokenizer, bad options are named, fp32 under bf16 autocast, NaN latents keep valid indices."""

from __future__ import annotations

import pytest
import torch

from imtok.models.autoencoder import Tokenizer, TokenizerConfig
from imtok.quantizers import ResidualFSQ
from imtok.quantizers.residual_fsq import split_stages, stack_stages

LEVELS = [(8, 5, 5, 5), (8, 6, 5), (4, 4), (7, 5, 5, 5, 5), (2, 3)]


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("levels", LEVELS)
def test_indices_codes_and_gradients_equal_the_peer(levels, stages):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    ours = ResidualFSQ(levels, stages=stages)
    theirs = peer_module.ResidualFSQ(levels=list(levels), num_quantizers=stages, is_channel_first=True)
    torch.manual_seed(stages)
    z = (torch.randn(3, len(levels), 6, 5) * 2).requires_grad_()
    z_peer = z.detach().clone().requires_grad_()
    out = ours(z)
    codes, indices = theirs(z_peer)
    assert out.indices.dtype == torch.int64 and out.indices.shape == (3, stages, 6, 5)
    assert torch.equal(out.indices, indices.long())
    assert torch.allclose(out.codes, codes, atol=1e-6)
    weights = torch.randn_like(codes)
    (out.codes * weights).sum().backward()
    (codes * weights).sum().backward()
    assert torch.allclose(z.grad, z_peer.grad, atol=1e-6)


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("levels", LEVELS)
def test_codes_indices_codes_round_trip(levels, stages):
    quantizer = ResidualFSQ(levels, stages=stages)
    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(0, quantizer.codebook_size, (2, stages, 4, 3), generator=gen)
    codes = quantizer.indices_to_codes(indices)
    # the codes are the sum of the stages' codes; bounded latents that equal them quantize back
    bound = quantizer._bound
    latents = torch.atanh(codes / bound) * bound
    assert torch.equal(quantizer(latents).indices, indices)
    assert torch.allclose(quantizer(latents).codes, codes, atol=1e-6)


def test_each_stage_shrinks_the_error():
    torch.manual_seed(0)
    z = torch.randn(8, 4, 8, 8)
    bound = ResidualFSQ([8, 5, 5, 5])._bound
    target = torch.tanh(z / bound) * bound
    errors = [
        (ResidualFSQ([8, 5, 5, 5], stages=stages)(z).codes - target).abs().max().item()
        for stages in (1, 2, 3)
    ]
    assert errors[0] > 4 * errors[1] > 16 * errors[2] > 0, errors


def test_statistics_count_the_codes_of_every_stage():
    quantizer = ResidualFSQ([4, 4], stages=2)
    out = quantizer(torch.randn(4, 2, 8, 8))
    assert out.stats["usage"].item() == pytest.approx(torch.unique(out.indices).numel() / 16)
    assert out.loss.item() == 0.0


def test_token_layout_stacks_the_stages_along_the_height_and_splits_back():
    indices = torch.arange(2 * 3 * 4 * 5).view(2, 3, 4, 5)
    tokens = stack_stages(indices)
    assert tokens.shape == (2, 12, 5)
    assert torch.equal(tokens[:, 4:8], indices[:, 1])  # stage 1's rows follow stage 0's
    assert torch.equal(split_stages(tokens, 3), indices)
    with pytest.raises(ValueError, match=r"3 residual stages"):
        split_stages(tokens[:, :11], 3)


def test_the_tokenizer_encodes_to_its_token_grid_and_decodes_it():
    config = TokenizerConfig(
        in_channels=1, image_size=16, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
        mid_attention=False, quantizer="rfsq", codebook_size=256, quantizer_options={"stages": 3},
    )  # fmt: skip
    assert config.token_grid == (24, 8)
    torch.manual_seed(0)
    model = Tokenizer(config).eval()
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    tokens = model.encode(images)
    assert tokens.shape == (2, 24, 8) and int(tokens.max()) < model.codebook_size == 240
    reconstruction, quantized = model(images)
    assert torch.equal(stack_stages(quantized.indices), tokens)
    assert torch.allclose(model.decode(tokens), reconstruction.clamp(-1, 1), atol=1e-5)


def test_bad_options_and_indices_are_named():
    with pytest.raises(ValueError, match=r"stages: expected an integer from 1 to 8, got 0"):
        ResidualFSQ([5, 5], stages=0)
    with pytest.raises(ValueError, match=r"stages: expected an integer from 1 to 8, got True"):
        ResidualFSQ([5, 5], stages=True)
    with pytest.raises(ValueError, match=r"levels\[1\]"):
        ResidualFSQ([5, 1])
    quantizer = ResidualFSQ([5, 5], stages=2)
    with pytest.raises(ValueError, match=r"one index per stage, shape \(B, 2, H, W\)"):
        quantizer.indices_to_codes(torch.zeros(1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"values in \[0, 25\)"):
        quantizer.indices_to_codes(torch.full((1, 2, 2, 2), 25))
    with pytest.raises(ValueError, match=r"3 channels but the quantizer expects 2"):
        quantizer(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"quantizer_options.stages: expected int for 'rfsq', got 'two'"):
        TokenizerConfig(quantizer="rfsq", codebook_size=256, quantizer_options={"stages": "two"})
    with pytest.raises(
        ValueError, match=r"tokenizer.quantizer_options.stages: expected an integer from 1 to 8"
    ):
        TokenizerConfig(quantizer="rfsq", codebook_size=256, quantizer_options={"stages": 9})
    with pytest.raises(ValueError, match=r"tokenizer.latent_dim: rfsq has one channel per level"):
        TokenizerConfig(quantizer="rfsq", codebook_size=256, latent_dim=4)


def test_bf16_autocast_quantizes_in_float32_and_nan_keeps_valid_indices():
    quantizer = ResidualFSQ([8, 5, 5, 5], stages=2)
    z = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = quantizer(z.bfloat16())
    full = quantizer(z.bfloat16().float())
    assert half.codes.dtype == torch.bfloat16 and torch.equal(half.indices, full.indices)
    z[0, :, 0, 0] = float("nan")
    out = quantizer(z)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < quantizer.codebook_size
    assert torch.isnan(out.codes[0, :, 0, 0]).all() and torch.isfinite(out.codes[1]).all()
