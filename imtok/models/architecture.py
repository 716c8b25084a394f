"""The models' architecture fields, declared once: ``params.yaml``'s `tokenizer` and `prior` sections
(``imtok.params``) and the models' own configs (``TokenizerConfig``, ``MaskGITConfig``, ``GPTConfig``)
extend ``TokenizerArchitecture`` and ``PriorArchitecture``, so a new architecture knob is one field here
(plus its line in params.yaml), and the params and the model get it with the same default and checks.

No torch here: the params boundary (``stages.check_params``) validates a file without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def raise_first_failed(section: str, checks: list[tuple[bool, str, str]]) -> None:
    """Raise ``ValueError("<section>.<key>: <message>")`` for the first ``(ok, key, message)`` not ok."""
    for ok, key, message in checks:
        if not ok:
            raise ValueError(f"{section}.{key}: {message}")


# Every quantizer by its name in params.yaml, with the class that implements it (``module:Class``,
# imported when ``imtok.models.autoencoder`` is): a new quantizer is its file plus one line here. Class
# paths rather than classes keep this module, and so the params boundary, free of torch.
QUANTIZER_CLASSES = {
    "fsq": "imtok.quantizers.fsq:FSQ",
    "vq": "imtok.quantizers.vq:VectorQuantizer",
    "regvq": "imtok.quantizers.regvq:RegularizedVQ",
    "lfq": "imtok.quantizers.lfq:LFQ",
    "bsq": "imtok.quantizers.bsq:BSQ",
    "simvq": "imtok.quantizers.simvq:SimVQ",
    "rfsq": "imtok.quantizers.residual_fsq:ResidualFSQ",
}
QuantizerKind = Literal[tuple(QUANTIZER_CLASSES)]  # type: ignore[valid-type]  # the names above


@dataclass(frozen=True)
class TokenizerArchitecture:
    """Encoder/decoder widths and depth, and which quantizer sits between (the pipeline's defaults)."""

    base_channels: int = 16  # width of the first resolution level
    channel_multipliers: tuple[int, ...] = (1, 2, 2)  # one per resolution: f = 2 ** (len - 1)
    num_res_blocks: int = 1  # residual blocks per resolution level
    mid_attention: bool = False  # single-head self-attention between the middle residual blocks
    conv_downsample: bool = True  # stride-2 conv3x3 (True) or 2x2 average pooling (False)
    dropout: float = 0.0
    quantizer: QuantizerKind = "fsq"  # a key of QUANTIZER_CLASSES
    levels: tuple[int, ...] | None = None  # fsq, rfsq; null: the FSQ paper's levels for codebook_size
    codebook_size: int | None = None  # null: 2^10 (fsq: the FSQ paper's levels [8, 5, 5, 5], 1000 codes)
    latent_dim: int | None = None  # vq/regvq code channels (null: 8); fsq: len(levels)
    quantizer_options: dict[str, Any] = field(default_factory=dict)  # e.g. beta, decay, mask_ratio

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "quantizer_options", dict(self.quantizer_options))
        multipliers = self.channel_multipliers
        checks = [
            (self.base_channels >= 1, "base_channels", f"must be >= 1, got {self.base_channels}"),
            (
                len(multipliers) > 0 and all(m >= 1 for m in multipliers),
                "channel_multipliers",
                f"must be a non-empty list of integers >= 1 (one per level), got {list(multipliers)}",
            ),
            (self.num_res_blocks >= 1, "num_res_blocks", f"must be >= 1, got {self.num_res_blocks}"),
            (0.0 <= self.dropout < 1.0, "dropout", f"must lie in [0, 1), got {self.dropout}"),
        ]
        raise_first_failed("tokenizer", checks)

    @property
    def architecture(self) -> dict[str, Any]:
        """The architecture fields and their values (what ``TokenizerConfig`` takes beside the image)."""
        return {name: getattr(self, name) for name in ARCHITECTURE}


ARCHITECTURE = tuple(TokenizerArchitecture.__dataclass_fields__)


@dataclass(frozen=True)
class PriorArchitecture:
    """The transformer of a MaskGIT or GPT prior (the pipeline's defaults); the token grid, the
    vocabulary and the classes come from the tokenizer and the token shards."""

    hidden_dim: int = 96
    depth: int = 3  # transformer blocks
    heads: int = 4
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * hidden_dim
    dropout: float = 0.1  # attention, residual and embedding dropout
    label_dropout: float = 0.1  # training-time probability of the null class (classifier-free guidance)
    label_smoothing: float = 0.1  # of the target tokens' loss (MaskGIT's paper uses 0.1)

    def __post_init__(self) -> None:
        checks = [
            (self.hidden_dim >= 1, "hidden_dim", f"expected an integer >= 1, got {self.hidden_dim}"),
            (self.depth >= 1, "depth", f"expected an integer >= 1 (number of blocks), got {self.depth}"),
            (self.heads >= 1, "heads", f"expected an integer >= 1, got {self.heads}"),
            (
                self.hidden_dim % max(self.heads, 1) == 0,
                "hidden_dim",
                f"{self.hidden_dim} is not divisible by prior.heads={self.heads}; use a multiple of it",
            ),
            (self.mlp_ratio > 0, "mlp_ratio", f"expected a number > 0, got {self.mlp_ratio}"),
            (0.0 <= self.dropout < 1.0, "dropout", f"expected a number in [0, 1), got {self.dropout}"),
            (
                0.0 <= self.label_dropout <= 1.0,
                "label_dropout",
                f"expected a probability in [0, 1], got {self.label_dropout}",
            ),
            (
                0.0 <= self.label_smoothing < 1.0,
                "label_smoothing",
                f"expected a number in [0, 1), got {self.label_smoothing}",
            ),
        ]
        raise_first_failed("prior", checks)

    @property
    def architecture(self) -> dict[str, Any]:
        """The architecture fields and their values."""
        return {name: getattr(self, name) for name in PRIOR_ARCHITECTURE}


PRIOR_ARCHITECTURE = tuple(PriorArchitecture.__dataclass_fields__)
