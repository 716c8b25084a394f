"""SimVQ: indices, codes and loss equal vector-quantize-pytorch's SimVQ on the same weights, one step
moves every code (the method's point), round trips, the frozen codebook is saved with the weights, bad
options are named, fp32 under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from imtok.quantizers import SimVQ


def peer_with_our_weights(ours: SimVQ):
    from vector_quantize_pytorch import SimVQ as PeerSimVQ

    theirs = PeerSimVQ(
        dim=ours.dim, codebook_size=ours.codebook_size, channel_first=True, rotation_trick=False
    )
    with torch.no_grad():
        theirs.frozen_codebook.copy_(ours.frozen_codebook)
        theirs.code_transform.weight.copy_(ours.transform.weight)
    return theirs


@pytest.mark.parametrize(("size", "dim"), [(16, 4), (1024, 8), (4096, 16)])
def test_indices_codes_and_loss_equal_the_peer_on_the_same_weights(size, dim):
    torch.manual_seed(size)
    ours = SimVQ(size, dim).train()
    theirs = peer_with_our_weights(ours).train()
    z = torch.randn(2, dim, 6, 5)
    out = ours(z)
    codes, indices, loss = theirs(z)
    assert torch.equal(out.indices, indices)
    assert torch.allclose(out.codes, codes, atol=1e-6)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_one_step_on_a_few_latents_moves_every_code():
    torch.manual_seed(0)
    quantizer = SimVQ(256, 4).train()
    before = quantizer.codebook.detach().clone()
    out = quantizer(torch.randn(1, 4, 2, 2))  # 4 latents: at most 4 codes are chosen
    out.loss.backward()
    torch.optim.SGD(quantizer.parameters(), lr=0.1).step()
    moved = (quantizer.codebook.detach() - before).norm(dim=1) > 0
    assert out.indices.unique().numel() <= 4 and bool(moved.all())


def test_codes_indices_round_trip_and_the_frozen_codebook_is_in_the_state_dict():
    quantizer = SimVQ(64, 6).eval()
    indices = torch.arange(64).view(1, 8, 8)
    codes = quantizer.indices_to_codes(indices)
    assert torch.equal(quantizer(codes).indices, indices)
    state = quantizer.state_dict()
    assert set(state) == {"frozen_codebook", "transform.weight"}
    again = SimVQ(64, 6)
    again.load_state_dict(state)
    assert torch.equal(again.indices_to_codes(indices), codes)
    assert not state["frozen_codebook"].requires_grad and quantizer.transform.weight.requires_grad


def test_bf16_autocast_quantizes_in_fp32_and_nothing_is_nan():
    quantizer = SimVQ(128, 8).train()
    z = torch.randn(2, 8, 3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert torch.equal(out.indices, quantizer(z.float()).indices)
    assert torch.isfinite(out.loss) and out.codes.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("args", "options", "named"),
    [((1, 4), {}, "codebook_size"), ((16, 0), {}, "dim"), ((16, 4), {"beta": -1.0}, "beta")],
)
def test_bad_options_raise_value_error_naming_them(args, options, named):
    with pytest.raises(ValueError, match=named):
        SimVQ(*args, **options)
