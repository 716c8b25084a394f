"""The tokenizer: shapes for every quantizer, encode/decode round trips, gradients, training, errors."""

import pytest
import torch
import torch.nn.functional as F

from imtok.models.autoencoder import (
    DEFAULT_CODE_DIM,
    Tokenizer,
    TokenizerConfig,
    build_quantizer,
    norm_groups,
)
from imtok.quantizers import FSQ, RegularizedVQ, VectorQuantizer

KINDS = ("fsq", "vq", "regvq", "lfq", "bsq", "simvq", "rfsq")
# Small codebooks for tiny models; vq uses a learned (not EMA) codebook so its gradient can be checked.
QUANTIZER_FIELDS = {
    "fsq": {"levels": (5, 5, 5)},
    "vq": {"codebook_size": 32, "latent_dim": 4, "quantizer_options": {"ema": False}},
    "regvq": {"codebook_size": 32, "latent_dim": 4},
    "lfq": {"codebook_size": 32},
    "bsq": {"latent_dim": 5},
    "simvq": {"codebook_size": 32, "latent_dim": 4},
    "rfsq": {"levels": (4, 4, 2), "quantizer_options": {"stages": 2}},
}
MULTIPLIERS = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 2)}  # downsampling factor f -> one per level


def tiny_config(kind: str, in_channels: int = 1, f: int = 4, **overrides) -> TokenizerConfig:
    """A tokenizer narrow enough for CPU tests: width 8-16, one residual block per level."""
    fields = {
        "in_channels": in_channels,
        "image_size": 16,
        "base_channels": 8,
        "channel_multipliers": MULTIPLIERS[f],
        "num_res_blocks": 1,
        "mid_attention": False,
        "quantizer": kind,
        **QUANTIZER_FIELDS[kind],
    }
    return TokenizerConfig(**{**fields, **overrides})


def random_images(batch: int, channels: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Uniform noise images (B, C, size, size) in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=gen) * 2 - 1


def disk_images(count: int = 16, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Grayscale images (N, 1, size, size) of one white disk each on black, values in {-1, 1}."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")  # (size, size)
    centres = torch.rand(count, 2, 1, 1, generator=gen) * 1.2 - 0.6  # (N, 2, 1, 1)
    radii = torch.rand(count, 1, 1, generator=gen) * 0.4 + 0.2  # (N, 1, 1)
    distance = ((xx - centres[:, 0]) ** 2 + (yy - centres[:, 1]) ** 2).sqrt()  # (N, size, size)
    return torch.where(distance < radii, 1.0, -1.0).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------
# forward, encode, decode


@pytest.mark.parametrize("mid_attention", [False, True])
@pytest.mark.parametrize("f", [2, 4, 8])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes_and_finite(kind, in_channels, f, mid_attention):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(kind, in_channels, f, mid_attention=mid_attention))
    images = random_images(2, in_channels)
    reconstruction, quantized = model(images)
    grid = (16 // f, 16 // f)
    assert reconstruction.shape == images.shape
    assert torch.isfinite(reconstruction).all()
    assert quantized.codes.shape == (2, model.quantizer.dim, *grid)
    assert model.tokens(quantized.indices).shape == (2, *model.token_grid)
    assert model.token_grid == (model.config.stages * grid[0], grid[1])
    assert quantized.loss.ndim == 0 and torch.isfinite(quantized.loss)


@pytest.mark.parametrize("kind", KINDS)
def test_average_pool_downsampling_gives_the_same_shapes(kind):
    model = Tokenizer(tiny_config(kind, 3, 8, conv_downsample=False, mid_attention=True))
    images = random_images(2, 3)
    reconstruction, quantized = model(images)
    assert reconstruction.shape == images.shape
    assert model.tokens(quantized.indices).shape == (2, 2 * model.config.stages, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_then_decode_equals_forward_in_eval_mode(kind):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(kind, 3, 4, mid_attention=True))
    images = random_images(4, 3)
    model(images)  # one training-mode pass: VQ initialises its codebook from this batch
    model.eval()
    reconstruction, quantized = model(images)
    indices = model.encode(images)
    assert torch.equal(indices, model.tokens(quantized.indices))
    decoded = model.decode(indices)
    assert decoded.shape == images.shape
    torch.testing.assert_close(decoded, reconstruction.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert decoded.min() >= -1 and decoded.max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_encode_is_deterministic_in_training_mode_and_leaves_the_model_as_it_was(kind):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(kind, 1, 4, dropout=0.5))
    images = random_images(4, 1)
    model(images)
    model.train()
    model.quantizer.eval()  # a mixed state must survive encode unchanged
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    first, second = model.encode(images), model.encode(images)
    assert torch.equal(first, second)
    assert model.training and model.encoder.training and not model.quantizer.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    model.eval()
    assert torch.equal(first, model.tokens(model(images)[1].indices))


@pytest.mark.parametrize("f", [2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_token_grid_is_image_size_over_f_and_indices_are_int64_codes(kind, f):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(kind, 1, f, image_size=24))
    assert model.downsample == f
    assert model.token_grid == (model.config.stages * 24 // f, 24 // f)
    indices = model.encode(random_images(3, 1, size=24))
    assert indices.shape == (3, *model.token_grid)
    assert indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < model.codebook_size
    wide = model.encode(random_images(1, 1, size=24)[..., : 2 * f, :])  # non-square input: (2f, 24)
    assert wide.shape == (1, 2 * model.config.stages, 24 // f)


def test_codebook_size_follows_the_quantizer():
    assert Tokenizer(tiny_config("fsq")).codebook_size == 125
    assert Tokenizer(tiny_config("regvq")).codebook_size == 32
    assert Tokenizer(tiny_config("fsq", levels=None, codebook_size=2**8)).codebook_size == 8 * 6 * 5


# ---------------------------------------------------------------------------------------------------
# gradients and training


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_encoder_decoder_and_learned_codebook(kind):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(kind, 3, 4, mid_attention=True))
    # A first batch initialises VQ's codebook by k-means; on that same batch each code would sit at
    # its cluster mean, where the codebook loss has zero gradient.
    model(random_images(2, 3, seed=1))
    images = random_images(2, 3)
    reconstruction, quantized = model(images)
    (F.mse_loss(reconstruction, images) + quantized.loss).backward()
    reached = {
        "encoder": model.encoder.blocks[0].weight,
        "quant_conv": model.quant_conv.weight,
        "post_quant_conv": model.post_quant_conv.weight,
        "decoder": model.decoder.blocks[-1].weight,
    }
    if kind == "vq":
        reached["codebook"] = model.quantizer.embed
    if kind == "regvq":
        reached["codebook"] = model.quantizer.codebook
    for name, parameter in reached.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_regvq_decoder_sees_the_sampled_codes_and_the_output_carries_pcl_weights():
    torch.manual_seed(0)
    config = tiny_config("regvq", 1, 4, quantizer_options={"mask_ratio": 1.0})
    model = Tokenizer(config)
    images = random_images(2, 1)
    reconstruction, quantized = model(images)
    stats = quantized.stats
    assert stats["pcl_weights"].shape == (2, *model.token_grid)
    assert stats["sample_mask"].all()
    assert (quantized.indices != stats["argmax_indices"]).any()  # some sampled codes differ
    with torch.no_grad():
        sampled = model.decode_codes(model.quantizer.indices_to_codes(quantized.indices))
        nearest = model.decode_codes(model.quantizer.indices_to_codes(stats["argmax_indices"]))
    torch.testing.assert_close(reconstruction.detach(), sampled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reconstruction.detach(), nearest, atol=1e-5)


# Final/initial eval MSE measured with this setup over seeds 0-3: fsq 0.010-0.019, vq 0.011-0.020,
# regvq 0.035-0.062 (its sampled codes keep the decoder training on noisier inputs); 0.25 leaves a
# margin of 4x or more.
MAX_LOSS_RATIO = 0.25


@pytest.mark.parametrize("kind", KINDS)
def test_short_training_lowers_reconstruction_error(kind, one_thread):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(kind, 1, 2))
    images = disk_images()  # (16, 1, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_mse() -> float:
        with torch.no_grad():
            model.eval()
            error = F.mse_loss(model(images)[0], images).item()
        model.train()
        return error

    initial = eval_mse()
    for _ in range(150):
        reconstruction, quantized = model(images)
        loss = F.mse_loss(reconstruction, images) + quantized.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = eval_mse()
    assert final < MAX_LOSS_RATIO * initial, (initial, final)


# ---------------------------------------------------------------------------------------------------
# build_quantizer


def test_build_quantizer_makes_each_kind_with_its_options():
    fsq = build_quantizer("fsq", codebook_size=2**10, symmetric=False)
    assert isinstance(fsq, FSQ) and fsq.levels == [8, 5, 5, 5] and not fsq.symmetric
    assert build_quantizer("fsq", levels=[4, 4], codebook_size=16).codebook_size == 16
    vq = build_quantizer("vq", codebook_size=64, dim=6, beta=0.5, ema=False)
    assert isinstance(vq, VectorQuantizer)
    assert (vq.codebook_size, vq.dim, vq.beta, vq.ema) == (64, 6, 0.5, False)
    regvq = build_quantizer("regvq", codebook_size=16, mask_ratio=0.2)
    assert isinstance(regvq, RegularizedVQ) and regvq.dim == DEFAULT_CODE_DIM and regvq.mask_ratio == 0.2


@pytest.mark.parametrize("channels", [*range(1, 70), 96, 128, 192, 256, 320, 512])
def test_norm_groups_divide_the_width(channels):
    groups = norm_groups(channels)
    assert channels % groups == 0 and 1 <= groups <= 32
    assert groups == 1 or channels // groups >= 4


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "make",
    [lambda: build_quantizer("magvit"), lambda: TokenizerConfig(quantizer="magvit")],
    ids=["build_quantizer", "config"],
)
def test_unknown_quantizer_kind_names_the_key_and_the_allowed_kinds(make):
    with pytest.raises(ValueError, match=r"tokenizer\.quantizer") as error:
        make()
    assert all(kind in str(error.value) for kind in KINDS) and "'magvit'" in str(error.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: build_quantizer("fsq", levels=[8, 5, 5, 5], codebook_size=1024),
        lambda: TokenizerConfig(levels=(8, 5, 5, 5), codebook_size=1024),
    ],
    ids=["build_quantizer", "config"],
)
def test_levels_inconsistent_with_codebook_size_name_both(make):
    with pytest.raises(ValueError, match=r"tokenizer\.levels") as error:
        make()
    message = str(error.value)
    assert "[8, 5, 5, 5]" in message and "1000" in message and "1024" in message


def test_image_size_not_divisible_by_f_names_the_field_and_f():
    with pytest.raises(ValueError, match=r"tokenizer.image_size: 30 .* f=4.* 28 or 32"):
        TokenizerConfig(image_size=30, channel_multipliers=(1, 2, 2))


def test_input_not_divisible_by_f_names_the_shape_and_f():
    model = Tokenizer(tiny_config("fsq", 1, 4))
    with pytest.raises(ValueError, match=r"\(18, 20\).*f=4"):
        model(torch.zeros(1, 1, 18, 20))


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (1, 16, 16), (2, 2, 16, 16)])
def test_wrong_channel_count_names_in_channels_and_the_shape(shape):
    model = Tokenizer(tiny_config("fsq", 1, 4))
    with pytest.raises(ValueError, match=r"tokenizer.in_channels=1") as error:
        model.encode(torch.zeros(shape))
    assert str(shape) in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"in_channels": 0}, "tokenizer.in_channels"),
        ({"image_size": 0}, "tokenizer.image_size"),
        ({"base_channels": 0}, "tokenizer.base_channels"),
        ({"channel_multipliers": ()}, "tokenizer.channel_multipliers"),
        ({"channel_multipliers": (1, 0)}, "tokenizer.channel_multipliers"),
        ({"num_res_blocks": 0}, "tokenizer.num_res_blocks"),
        ({"dropout": 1.0}, "tokenizer.dropout"),
        ({"levels": (8, 1)}, r"tokenizer.levels\[1\]"),
        ({"levels": None, "codebook_size": 1000}, "codebook_size"),
        ({"latent_dim": 4}, "tokenizer.latent_dim"),
        ({"quantizer_options": {"decay": 0.9}}, "tokenizer.quantizer_options: unknown option 'decay'"),
        ({"quantizer": "vq"}, "tokenizer.levels: only fsq and rfsq take levels"),
        ({"quantizer": "vq", "levels": None, "codebook_size": 1}, "tokenizer.codebook_size"),
        ({"quantizer": "regvq", "levels": None, "latent_dim": 0}, "tokenizer.latent_dim"),
    ],
)
def test_invalid_config_fields_are_named(overrides, key):
    fields = {"levels": (5, 5, 5), **overrides}
    with pytest.raises(ValueError, match=key):
        TokenizerConfig(**fields)


def test_decode_rejects_indices_outside_the_codebook():
    model = Tokenizer(tiny_config("regvq", 1, 4))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="indices"):
        model.decode(torch.zeros(1, 4, 4))


@pytest.mark.parametrize("kind", ["lfq", "bsq"])
def test_binary_quantizers_take_their_channels_from_a_power_of_two_codebook(kind):
    assert build_quantizer(kind, codebook_size=4096).dim == 12
    assert build_quantizer(kind, dim=6).codebook_size == 64
    assert build_quantizer(kind).codebook_size == 1024  # the default size
    with pytest.raises(ValueError, match=r"tokenizer\.codebook_size: .* power of two \(e\.g\. 512 or 1024\)"):
        build_quantizer(kind, codebook_size=1000)
    with pytest.raises(ValueError, match=r"tokenizer\.latent_dim: .* set latent_dim to 8 or null"):
        build_quantizer(kind, codebook_size=256, dim=4)


def test_every_named_quantizer_loads_from_params_and_builds_its_class():
    from imtok.models.architecture import QUANTIZER_CLASSES
    from imtok.models.autoencoder import QUANTIZERS
    from imtok.params import Params

    for kind, at in QUANTIZER_CLASSES.items():
        params = Params.from_dict({"tokenizer": {"quantizer": kind}})  # the params boundary takes the name
        model = Tokenizer(params.tokenizer_config(1, 16))
        assert type(model.quantizer) is QUANTIZERS[kind], kind
        assert f"{type(model.quantizer).__module__}:{type(model.quantizer).__name__}" == at, kind
    with pytest.raises(ValueError, match=r"tokenizer\.quantizer: unknown value 'magvit'"):
        Params.from_dict({"tokenizer": {"quantizer": "magvit"}})
