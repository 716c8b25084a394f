"""Tokenizer losses: reconstruction, perceptual and probabilistic contrastive (VGG-19), PatchGAN.

The perceptual and contrastive terms need pretrained VGG-19 weights, which this module never
downloads: ``load_vgg_weights`` looks for them in a configured file and in the local timm / Hugging
Face and torch hub caches. When none are found both losses switch themselves off, warn with a
``VGGWeightsMissingWarning`` saying where they looked, return 0 and keep the reason in
``disabled_reason`` for the training stage to record. Features of a randomly initialised VGG are
never used.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.weights import Cache, FoundWeights, Setting, existing, locate_weights

ReconstructionKind = Literal["l1", "l2"]

# The params key that names a local VGG-19 weights file; messages point users at it.
WEIGHTS_SETTING = "tokenizer.vgg_weights"

# Indices of the ReLUs in timm's (and torchvision's, which has the same layout) vgg19 ``features``
# Sequential. VGG-19 has 2, 2, 4, 4, 4 convs per block, so relu3_3..relu5_3 sit one conv before each
# block's last one (VGG-16's indices 15, 22, 29 would pick other layers).
VGG19_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 24, "relu5_3": 33}

# Four 2x2 max-pools precede relu5_3: smaller images leave it with no spatial positions.
MIN_IMAGE_SIZE = 16

# ImageNet statistics the VGG-19 weights were trained with, for images in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm's VGG-19 weights on the Hugging Face hub and the files its cache may hold.
HF_REPO_ID = "timm/vgg19.tv_in1k"
HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
# torchvision's VGG-19 checkpoint (also what older timm versions downloaded) in torch hub's cache.
TORCH_HUB_FILENAME = "vgg19-dcbccda6.pth"

# PatchNCE temperature of CUT (Park et al. 2020), which the contrastive loss follows.
DEFAULT_TEMPERATURE = 0.07
DEFAULT_NUM_PATCHES = 256


class VGGWeightsMissingWarning(UserWarning):
    """No VGG-19 weights were found, so a VGG-based loss is switched off."""


# ---------------------------------------------------------------------------------------------------
# Reconstruction


def reconstruction_loss(x: Tensor, y: Tensor, kind: ReconstructionKind = "l1") -> Tensor:
    """Mean absolute (``"l1"``) or squared (``"l2"``) error between two image batches."""
    if kind == "l1":
        return F.l1_loss(x, y)
    if kind == "l2":
        return F.mse_loss(x, y)
    raise ValueError(f"tokenizer.recon_loss: expected 'l1' | 'l2', got {kind!r}")


# ---------------------------------------------------------------------------------------------------
# VGG-19 weights


def _vgg19_trunk() -> nn.Sequential:
    """timm's vgg19 ``features`` up to relu5_3, on the meta device (no memory, no random init)."""
    # Imported here: timm loads torchvision's models and torch._dynamo (about 4 s), which every stage
    # that imports the trainers would otherwise pay at start-up even when no VGG weights are present.
    import timm

    with torch.device("meta"):
        model = timm.create_model("vgg19", pretrained=False)
    return model.features[: VGG19_LAYERS["relu5_3"] + 1]


@cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the VGG-19 trunk, named ``features.N.weight`` like timm's."""
    return {f"features.{name}": tuple(p.shape) for name, p in _vgg19_trunk().state_dict().items()}


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, resolved from the environment as huggingface_hub does."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hf_cached_file(cache_dir: Path, repo_id: str, filename: str) -> Path | None:
    """A file of the repo's ``main`` snapshot in the local hub cache, or None; reads disk only."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
        ref = repo_dir / "refs" / "main"
        revision = ref.read_text().strip() if ref.is_file() else "main"
        candidate = repo_dir / "snapshots" / revision / filename
        return candidate if candidate.is_file() else None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    return Path(found) if isinstance(found, str) else None


def _torch_hub_checkpoint() -> Path:
    """Where torch hub keeps torchvision's VGG-19 checkpoint (honours TORCH_HOME / XDG_CACHE_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_HUB_FILENAME


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a .safetensors file or a torch state dict, without running pickled code."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            # Only the convolutional trunk is read: a full checkpoint also holds ~500 MB of classifier.
            names = [key for key in handle.keys() if _trunk_name(key) is not None]  # noqa: SIM118 (not a dict)
            return {key: handle.get_tensor(key) for key in names}
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise TypeError(f"expected a state dict, found a {type(loaded).__name__}")
    return loaded


def _trunk_name(key: str) -> str | None:
    """The trunk parameter name (``features.N.weight``) a checkpoint key stands for, or None.

    timm and torchvision name the convolutional layers identically (``features.N.weight``); they
    differ only in the classifier, which is dropped. A ``module.`` prefix (DataParallel) is removed,
    and keys saved from ``vgg.features`` alone (``N.weight``) get the ``features.`` prefix.
    """
    name = key.removeprefix("module.")
    name = f"features.{name}" if name[:1].isdigit() else name
    return name if name in _expected_shapes() else None


def _feature_state_dict(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The trunk's entries of a timm, torchvision or bare ``features`` state dict, renamed."""
    renamed = {_trunk_name(key): value for key, value in tensors.items()}
    return {name: value for name, value in renamed.items() if name is not None}


def _check_shapes(state_dict: dict[str, Tensor], path: Path) -> None:
    """Raise a ValueError naming ``path`` unless ``state_dict`` holds every trunk tensor, right-sized."""
    expected = _expected_shapes()
    missing = sorted(set(expected) - set(state_dict), key=lambda name: int(name.split(".")[1]))
    if missing:
        raise ValueError(
            f"VGG-19 weights file {path}: missing {len(missing)} of the {len(expected)} convolution "
            f"tensors of VGG-19's features (first: {', '.join(missing[:3])}); expected timm's or "
            "torchvision's vgg19 state dict"
        )
    wrong = [
        f"{name} {tuple(state_dict[name].shape)} != {shape}"
        for name, shape in expected.items()
        if tuple(state_dict[name].shape) != shape
    ]
    if wrong:
        raise ValueError(
            f"VGG-19 weights file {path}: tensor shapes do not match VGG-19 ({'; '.join(wrong[:3])}); "
            "is it another VGG variant?"
        )


def read_vgg_weights(path: str | Path) -> dict[str, Tensor]:
    """VGG-19 trunk state dict (``features.N.*``) from a .pth/.pt/.bin or .safetensors file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_SETTING}: VGG-19 weights file {path} does not exist")
    try:
        tensors = _read_tensors(path)
    except Exception as error:  # corrupt or foreign files fail in many library-specific ways
        raise ValueError(f"VGG-19 weights file {path} could not be read: {error}") from error
    state_dict = _feature_state_dict(tensors)
    _check_shapes(state_dict, path)
    return state_dict


def load_vgg_weights(path: str | Path | None = None) -> FoundWeights:
    """Find VGG-19 weights on this machine (``imtok.weights``): the configured file, then the HF and
    torch hub caches.

    Order: (a) ``path`` when given (a missing or unreadable configured file is an error, not a
    fallback); (b) timm's ``vgg19.tv_in1k`` in the Hugging Face hub cache (``HF_HUB_CACHE``,
    ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub`` or ``XDG_CACHE_HOME/huggingface/hub``); (c)
    torchvision's ``vgg19-dcbccda6.pth`` in torch hub's ``checkpoints`` (``TORCH_HOME/hub``). When
    nothing is found the state dict is None and ``reason`` lists the places checked and how to provide
    weights.
    """
    hub_cache = _hf_hub_cache()
    hf_repo_dir = hub_cache / f"models--{HF_REPO_ID.replace('/', '--')}"

    def in_hf_cache() -> Path | None:
        found = (_hf_cached_file(hub_cache, HF_REPO_ID, filename) for filename in HF_FILENAMES)
        return next((path for path in found if path is not None), None)

    checkpoint = _torch_hub_checkpoint()
    return locate_weights(
        "pretrained VGG-19 weights",
        [Setting(WEIGHTS_SETTING, path)],
        [
            Cache(f"Hugging Face hub cache: {hf_repo_dir} ({' or '.join(HF_FILENAMES)})", in_hf_cache),
            Cache(f"torch hub cache: {checkpoint}", lambda: existing(checkpoint)),
        ],
        read_vgg_weights,
        f"To enable, copy the model.safetensors of {HF_REPO_ID} (timm) or torchvision's "
        f"{TORCH_HUB_FILENAME} to this machine and set {WEIGHTS_SETTING} to its path (or place it at "
        "(b) or (c)).",
    )


# ---------------------------------------------------------------------------------------------------
# VGG-19 features


class VGGFeatures(nn.Module):
    """Frozen VGG-19 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of [-1, 1] images.

    Built from timm's ``vgg19`` (``pretrained=False``, then ``state_dict`` loaded; there is no
    random-weight mode). Inputs are (B, 1 or 3, H, W) with H, W >= 16; one channel is repeated to
    three, then ImageNet-normalised. Always in eval mode with ``requires_grad`` False; gradients still
    flow to the input. ``source`` says where the weights came from.
    """

    def __init__(self, state_dict: dict[str, Tensor], source: str = "given state dict") -> None:
        super().__init__()
        self.features = _vgg19_trunk().to_empty(device="cpu")
        self.load_state_dict(_feature_state_dict(state_dict), strict=True)
        self.source = source
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> VGGFeatures:
        """Features with the weights of one .pth/.pt/.safetensors file (timm or torchvision names)."""
        return cls(read_vgg_weights(path), str(path))

    def train(self, mode: bool = True) -> VGGFeatures:
        """Stay in eval mode: the network is a fixed feature extractor."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Five feature maps (B, C_l, H_l, W_l) for images (B, 1 | 3, H, W) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected shape (B, 1 | 3, H, W), got {tuple(images.shape)}")
        if min(images.shape[-2:]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"images: VGG-19 features need H, W >= {MIN_IMAGE_SIZE}, got {tuple(images.shape[-2:])}"
            )
        hidden = images.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        hidden = ((hidden + 1.0) * 0.5 - self.mean) / self.std
        outputs = []
        taps = set(VGG19_LAYERS.values())
        # The in-place ReLUs are safe to tap: each tapped output feeds only a conv or a max-pool.
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in taps:
                outputs.append(hidden)
        return outputs


def _features_or_reason(
    weights_path: str | Path | None, features: VGGFeatures | None, loss_name: str
) -> tuple[VGGFeatures | None, str | None]:
    """Given or loaded VGG features, or None and the warned reason why the loss is switched off."""
    if features is not None:
        return features, None
    weights = load_vgg_weights(weights_path)
    if weights.state_dict is None:
        reason = f"{loss_name} disabled: {weights.reason}"
        warnings.warn(reason, VGGWeightsMissingWarning, stacklevel=3)
        return None, reason
    return VGGFeatures(weights.state_dict, weights.source or "given state dict"), None


# ---------------------------------------------------------------------------------------------------
# Perceptual loss


def unit_channels(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Feature maps (B, C, H, W) scaled to unit L2 norm over channels at every position."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def perceptual_distance(a: Tensor, b: Tensor) -> Tensor:
    """Sum over channels of squared differences of unit-normalised features, averaged over B, H, W."""
    return (unit_channels(a) - unit_channels(b)).pow(2).sum(dim=1).mean()


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on VGG-19 features, without LPIPS's learned linear heads.

    Mean over relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of ``perceptual_distance``: each position's
    channel vector is scaled to unit length and the squared differences are summed over channels and
    averaged over positions and images (LPIPS with every channel weighted 1). Each layer lies in
    [0, 4]; identical images give 0. No gradient reaches the target images.

    Without VGG-19 weights (see ``load_vgg_weights``) ``enabled`` is False, ``disabled_reason`` says
    why and ``forward`` returns 0. Pass ``features`` to share one ``VGGFeatures`` between losses.
    """

    def __init__(self, weights_path: str | Path | None = None, *, features: VGGFeatures | None = None):
        super().__init__()
        self.features, self.disabled_reason = _features_or_reason(weights_path, features, "perceptual loss")

    @property
    def enabled(self) -> bool:
        """Whether pretrained features are loaded and the loss is computed."""
        return self.features is not None

    def forward(self, images: Tensor, reconstruction: Tensor) -> Tensor:
        """Scalar perceptual distance between images and reconstructions (B, C, H, W), or 0 if off."""
        if self.features is None:
            return reconstruction.new_zeros(())
        with torch.no_grad():
            targets = self.features(images)
        outputs = self.features(reconstruction)
        return torch.stack([perceptual_distance(o, t) for o, t in zip(outputs, targets, strict=True)]).mean()


# ---------------------------------------------------------------------------------------------------
# Probabilistic contrastive loss (Regularized VQ)


def patch_nce(query: Tensor, keys: Tensor, weights: Tensor, tau: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Weighted PatchNCE with averaged negatives for query, keys (N, P, C) and weights (N, P).

    Vectors are L2-normalised over C and ``s_ij = <q_i, k_j> / tau`` within each of the N images.
    With ``L = P - 1`` negatives per query::

        l_i  = -log( exp(s_ii) / (exp(s_ii) + (1 / L) * sum_{j != i} exp(s_ij)) )
        loss = sum_{n, i} w_{n,i} * l_{n,i} / sum_{n, i} w_{n,i}

    Averaging the negatives (rather than summing) keeps the scale independent of P. P == 1 gives
    l = 0 (nothing to contrast). All weights 0 gives 0: no position was sampled by the quantizer.
    """
    query = F.normalize(query.float(), dim=-1)
    keys = F.normalize(keys.float(), dim=-1)
    num_patches = query.shape[1]
    logits = query @ keys.transpose(1, 2) / tau  # (N, P, P)
    diagonal = torch.eye(num_patches, dtype=torch.bool, device=query.device)  # (P, P)
    # Subtracting log L from every negative logit divides its exp-term by L inside the logsumexp.
    shifted = logits - (~diagonal) * math.log(max(num_patches - 1, 1))  # (N, P, P)
    per_patch = shifted.logsumexp(dim=-1) - logits.diagonal(dim1=1, dim2=2)  # (N, P)
    weights = weights.to(per_patch.dtype)
    total = weights.sum()
    # torch.where rather than a Python branch: no host sync on the accelerator.
    return torch.where(total > 0, (weights * per_patch).sum() / total.clamp_min(1e-12), total * 0)


def resample_weights(weights: Tensor, size: tuple[int, int]) -> Tensor:
    """Token-grid weights (B, h, w) averaged / repeated onto a (B, H, W) feature grid (area mode)."""
    return F.adaptive_avg_pool2d(weights.unsqueeze(1), size).squeeze(1)


def sample_locations(batch: int, num_positions: int, num_patches: int, device: torch.device) -> Tensor:
    """Per-image position ids (B, P): all positions if they fit, else P distinct uniform draws."""
    if num_positions <= num_patches:
        return torch.arange(num_positions, device=device).expand(batch, -1)
    return torch.rand(batch, num_positions, device=device).topk(num_patches, dim=1).indices


def gather_positions(values: Tensor, locations: Tensor) -> Tensor:
    """Entries (B, P, C) of channel-first maps (B, C, H, W) at flat positions (B, P)."""
    flat = values.flatten(2).transpose(1, 2)  # (B, H*W, C)
    return flat.gather(1, locations.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))


class ProbabilisticContrastiveLoss(nn.Module):
    """Probabilistic contrastive loss of Regularized VQ (Zhang et al., CVPR 2023) on VGG-19 features.

    At each of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 with feature grid H x W: up to
    ``num_patches`` positions per image are drawn uniformly (all when H*W fits), the same for the
    image and its reconstruction. Queries are the reconstruction's features there, keys the input
    image's; a query's positive is the key at its own position, its negatives the keys at the other
    drawn positions of the same image. The quantizer's ``pcl_weights`` (B, h, w) are area-resampled
    to H x W and renormalised over the drawn positions, and ``patch_nce`` (see its formula) gives the
    layer's loss. The result is the mean over layers with at least two positions. CUT's learned
    projection heads are not used. No gradient reaches the input images.

    Weights that are all 0 (eval mode, or no position sampled) give 0, as the paper's loss covers
    the stochastically quantized positions only. Without VGG-19 weights ``enabled`` is False,
    ``disabled_reason`` says why and ``forward`` returns 0.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        *,
        features: VGGFeatures | None = None,
        num_patches: int = DEFAULT_NUM_PATCHES,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        super().__init__()
        if num_patches < 2:
            raise ValueError(f"num_patches: expected an integer >= 2, got {num_patches!r}")
        if temperature <= 0:
            raise ValueError(f"temperature: expected a value > 0, got {temperature!r}")
        self.num_patches = num_patches
        self.temperature = temperature
        self.features, self.disabled_reason = _features_or_reason(
            weights_path, features, "probabilistic contrastive loss"
        )

    @property
    def enabled(self) -> bool:
        """Whether pretrained features are loaded and the loss is computed."""
        return self.features is not None

    def forward(self, images: Tensor, reconstruction: Tensor, weights: Tensor) -> Tensor:
        """Scalar loss for images, reconstructions (B, C, H, W) and token weights (B, h, w)."""
        if weights.ndim != 3 or weights.shape[0] != images.shape[0]:
            raise ValueError(
                f"weights: expected shape (B, h, w) with B = {images.shape[0]}, got {tuple(weights.shape)}"
            )
        if self.features is None:
            return reconstruction.new_zeros(())
        with torch.no_grad():
            keys = self.features(images)
        queries = self.features(reconstruction)
        losses = [
            self._layer_loss(query, key, weights)
            for query, key in zip(queries, keys, strict=True)
            if query.shape[-2] * query.shape[-1] >= 2
        ]
        return torch.stack(losses).mean() if losses else reconstruction.new_zeros(())

    def _layer_loss(self, query: Tensor, key: Tensor, weights: Tensor) -> Tensor:
        """``patch_nce`` of one layer's feature maps (B, C, H, W) at freshly drawn positions."""
        batch, _, height, width = query.shape
        locations = sample_locations(batch, height * width, self.num_patches, query.device)  # (B, P)
        layer_weights = resample_weights(weights.to(query.dtype), (height, width))  # (B, H, W)
        point_weights = layer_weights.flatten(1).gather(1, locations)  # (B, P)
        return patch_nce(
            gather_positions(query, locations),  # (B, P, C)
            gather_positions(key, locations),  # (B, P, C)
            point_weights,
            self.temperature,
        )

    def extra_repr(self) -> str:
        return f"num_patches={self.num_patches}, temperature={self.temperature}, enabled={self.enabled}"


# ---------------------------------------------------------------------------------------------------
# Adversarial loss (PatchGAN, as in pix2pix and VQGAN)


def _norm(norm_layer: Callable[[int], nn.Module], channels: int) -> nn.Module:
    """``norm_layer(channels)``; nn.GroupNorm gets up to 32 groups that divide ``channels``."""
    if norm_layer is nn.GroupNorm:
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return norm_layer(channels)


def _init_gan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), norm shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def patch_logits_size(image_size: int, n_layers: int) -> int:
    """The side of ``PatchDiscriminator``'s logit map for square images of ``image_size`` pixels: each
    stride-2 4x4 convolution (padding 1) maps s to s // 2, each stride-1 one to s - 1. Below 1 the
    images are too small for that many layers (the convolutions would fail)."""
    size = image_size // 2  # the first convolution
    for n in range(1, n_layers + 1):
        size = size // 2 if n < n_layers else size - 1
    return size - 1  # the convolution to one channel


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: a (B, 1, H', W') map of real/fake logits, one per receptive field.

    A 4x4 stride-2 conv and LeakyReLU(0.2), then ``n_layers`` 4x4 convs (stride 2, the last stride 1)
    with channels ``base_channels * min(2^n, 8)``, each followed by ``norm_layer`` and LeakyReLU(0.2),
    then a 4x4 conv to one channel. ``norm_layer`` is a class taking the channel count
    (``nn.BatchNorm2d`` by default, ``nn.GroupNorm`` also accepted).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        n_layers: int = 3,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers: expected an integer >= 1, got {n_layers!r}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = base_channels
        for n in range(1, n_layers + 1):
            out_channels = base_channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                # No bias: the normalisation that follows removes it.
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=False),
                _norm(norm_layer, out_channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_gan_weights)

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, 1, H', W') for images (B, in_channels, H, W)."""
        return self.layers(images)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Generator's hinge-GAN loss -mean(fake_logits)."""
    return -fake_logits.mean()


def adaptive_gan_weight(
    recon_loss: Tensor, g_loss: Tensor, last_layer_weight: Tensor, max_weight: float = 1e4
) -> Tensor:
    """VQGAN's balance ||d recon / d W|| / (||d g / d W|| + 1e-4), clamped to [0, max_weight], detached.

    ``W`` is the decoder's last layer weight; both graphs are kept for the backward pass that follows.
    """
    (recon_grad,) = torch.autograd.grad(recon_loss, last_layer_weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    return (recon_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def gan_factor(step: int, start_step: int, factor: float = 1.0) -> float:
    """``factor`` from ``start_step`` on, 0 before: the GAN term starts once reconstructions settle."""
    return factor if step >= start_step else 0.0
