"""The fused (compiled) FSQ path against the eager reference: same indices, codes and gradients."""

import pytest
import torch
from conftest import needs_compiler

from imtok.quantizers import fsq as fsq_module
from imtok.quantizers.fsq import FSQ

CASES = [
    ([8, 5, 5, 5], True),  # even and odd levels, symmetric bound (half-integer grid for the 8)
    ([7, 5, 5, 5, 5], True),  # odd levels only: integer grid
    ([8, 6, 5], False),  # the paper's exact bound for even levels: shift and offset in play
]


def latents(channels: int, seed: int) -> torch.Tensor:
    """N(0, 2) latents plus saturated values and exact zeros, (3, C, 5, 7)."""
    z = torch.randn(3, channels, 5, 7, generator=torch.Generator().manual_seed(seed)) * 2
    z[0, :, 0, 0] = 0.0
    z[1, :, 1, 1] = 30.0
    z[2, :, 2, 2] = -30.0
    return z


@needs_compiler
@pytest.mark.parametrize(("levels", "symmetric"), CASES)
def test_fused_path_matches_the_eager_reference(levels, symmetric):
    eager = FSQ(levels, symmetric=symmetric, fused=False).train()
    fused = FSQ(levels, symmetric=symmetric, fused=True).train()
    assert fused.uses_fused(torch.zeros(1)) and not eager.uses_fused(torch.zeros(1))
    for seed, shape_scale in ((0, 1), (1, 2)):  # a second batch size: dynamic shapes, no wrong reuse
        z = latents(len(levels), seed).repeat(shape_scale, 1, 1, 1)
        z_eager, z_fused = z.clone().requires_grad_(), z.clone().requires_grad_()
        out_eager, out_fused = eager(z_eager), fused(z_fused)
        assert torch.equal(out_fused.indices, out_eager.indices)
        torch.testing.assert_close(out_fused.codes, out_eager.codes, rtol=0, atol=1e-6)
        weights = torch.randn_like(z)
        (out_eager.codes * weights).sum().backward()
        (out_fused.codes * weights).sum().backward()
        torch.testing.assert_close(z_fused.grad, z_eager.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(fused.indices_to_codes(out_fused.indices), out_fused.codes.detach())


@needs_compiler
def test_fused_path_keeps_the_input_dtype_and_stats():
    quantizer = FSQ([8, 5, 5, 5], fused=True)
    z = latents(4, 2).to(torch.bfloat16)
    out = quantizer(z)
    assert out.codes.dtype == torch.bfloat16
    assert out.indices.dtype == torch.int64 and out.indices.shape == (3, 5, 7)
    assert set(out.stats) >= {"usage", "perplexity"}
    assert out.loss.item() == 0.0


def test_noise_and_the_default_choose_the_eager_path():
    assert not FSQ([8, 5, 5, 5]).uses_fused(torch.zeros(1))  # default: fused on CUDA only
    noisy = FSQ([8, 5, 5, 5], noise_prob=0.5, fused=True)
    assert not noisy.train().uses_fused(torch.zeros(1))
    assert noisy.eval().uses_fused(torch.zeros(1))
    with pytest.raises(ValueError, match="fused: expected true, false or null"):
        FSQ([8, 5, 5, 5], fused="yes")


def test_a_fused_path_that_cannot_compile_hands_over_to_eager_unless_asked_for(monkeypatch, caplog):
    from imtok.quantizers import fsq_fused
    from imtok.quantizers.common import FAST_PATH_FAILURES

    def broken(*args):
        raise RuntimeError("no Triton for this GPU")

    monkeypatch.setattr(fsq_fused, "fused_fsq", broken)
    z = latents(4, 3)
    default = FSQ([8, 5, 5, 5]).eval()  # fused=None: would take the fused path on CUDA
    try:
        with caplog.at_level("WARNING", logger="imtok.quantizers.common"):
            codes, indices = default._quantize_fused(z)
        expected = FSQ([8, 5, 5, 5], fused=False).eval()(z)
        assert torch.equal(indices, expected.indices) and torch.equal(codes, expected.codes)
        assert "using the reference path" in caplog.text
        assert "no Triton" in FAST_PATH_FAILURES[fsq_module.FUSED_PATH]
        assert not default.uses_fused(z.cuda() if torch.cuda.is_available() else z)  # not tried again
        with pytest.raises(RuntimeError, match="no Triton"):
            FSQ([8, 5, 5, 5], fused=True).eval()(z)
    finally:
        FAST_PATH_FAILURES.pop(fsq_module.FUSED_PATH, None)


def test_under_a_dispatch_mode_such_as_the_flop_counter_the_eager_path_runs():
    # Compiled code cannot run under FlopCounterMode: asked for, the fused path raised there; by default
    # (on CUDA) the failure wrote it off for the rest of the process.
    from torch.utils.flop_counter import FlopCounterMode

    fsq = FSQ([8, 5, 5, 5], fused=True)
    z = latents(4, seed=3)
    assert fsq.uses_fused(z)
    with FlopCounterMode(display=False):
        assert not fsq.uses_fused(z)
        counted = fsq(z)
    assert torch.equal(counted.indices, FSQ([8, 5, 5, 5], fused=False)(z).indices)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_compiler)])
def test_nan_latents_get_a_valid_index_and_keep_a_nan_code(fused):
    # A diverged encoder: its indices must stay code ids (the usage counts index with them, on a GPU
    # an out-of-range id is a device-side assert); the NaN codes carry the divergence to the loss.
    quantizer = FSQ([8, 5, 5, 5], fused=fused).train()
    z = latents(4, 3)
    z[0, :, 1, 2] = float("nan")
    z[1, 2, 0, 0] = float("nan")
    out = quantizer(z)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < quantizer.codebook_size
    assert torch.isnan(out.codes[0, :, 1, 2]).all() and torch.isnan(out.codes[1, 2, 0, 0])
    finite = torch.isfinite(z).all(dim=1)  # (B, H, W)
    reference = FSQ([8, 5, 5, 5], fused=False)(torch.nan_to_num(z, nan=0.0)).indices
    assert torch.equal(out.indices[finite], reference[finite])
    assert out.stats["usage"] > 0


@needs_compiler
def test_training_and_inference_calls_share_one_compiled_kernel():
    # Seven channels: a count no other test compiles, so the first call below compiles it afresh.
    quantizer = FSQ([3] * 7, fused=True)
    z = torch.randn(2, 7, 4, 4)
    quantizer.eval()(z)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = quantizer.train()(z.clone().requires_grad_())  # would recompile on a requires_grad guard
    out.codes.sum().backward()  # the backward kernel's own first compile for seven channels
    with torch._dynamo.config.patch(error_on_recompile=True):
        quantizer.eval()(torch.randn(3, 7, 5, 5))  # other batch and spatial sizes: still dynamic
