"""Autoregressive GPT prior: a causal transformer over the token grid in raster order.

Sequence. The model reads ``[class prefix, t_0, t_1, ..., t_{L-1}]`` and the logits at sequence
position i predict token i: the class prefix predicts t_0, the position holding t_{i-1} predicts t_i.
Training on N = h * w tokens therefore feeds the prefix and t_0 .. t_{N-2} (N positions, as many
learned positional embeddings) and scores all N tokens with next-token cross-entropy.

Conditioning is the class prefix of ``imtok.models.maskgit.ClassEmbedding``: a table of
num_classes + 1 rows whose last row is the null class, used for unconditional priors, for
``labels=None`` and, in training mode, for a fraction ``label_dropout`` of the labels (classifier-free
guidance). The blocks are MaskGIT's pre-norm blocks run causally.

Key/value cache. ``forward(tokens, labels, cache)`` with a ``KVCache`` appends the keys and values of
the new positions to the cache, layer by layer, and attends the new queries to everything cached, so
decoding one token costs O(L) attention work instead of re-running the whole prefix (O(L^2)). An empty
cache starts a sequence (the class prefix is prepended); a non-empty one continues it with ``tokens``
holding only the new tokens. Keys and values grow by concatenation: one copy of the cache per step,
the same order of work as the attention itself, and no maximum length to allocate for in advance.

Sampling is ``imtok.sampling.autoregressive_sample``; ``imtok.sampling.gpt_next_token_logits`` binds a
``GPT`` to its callable interface.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.models.maskgit import (
    ClassEmbedding,
    PriorConfig,
    TransformerBlock,
    check_labels,
    init_transformer_weights,
    positional_embedding,
)
from imtok.quantizers.common import check_indices
from imtok.training import unwrap_model


@dataclass(frozen=True, kw_only=True)
class GPTConfig(PriorConfig):
    """Shape of the GPT prior."""


@dataclass
class KVCache:
    """Keys and values (B, nh, S, hs) of every layer for the S sequence positions seen so far."""

    layers: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Sequence positions cached (the class prefix counts as one); 0 for an empty cache."""
        if not self.layers or self.layers[0] is None:
            return 0
        return self.layers[0][0].shape[2]

    @property
    def batch(self) -> int | None:
        """Batch size of the cached sequences, None for an empty cache."""
        return None if self.length == 0 else self.layers[0][0].shape[0]


class GPT(nn.Module):
    """Causal transformer: next-token logits over the codebook for raster-ordered token sequences."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_dim
        self.token_embedding = nn.Embedding(config.codebook_size, dim)
        self.class_embedding = ClassEmbedding(config.num_classes, dim, config.label_dropout)
        self.position_embedding = positional_embedding(config.num_tokens, dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config.codebook_size)
        init_transformer_weights(self, config.depth)

    @property
    def null_class(self) -> int:
        """The class id of the unconditional (null) class (= num_classes)."""
        return self.class_embedding.null_class

    def new_cache(self) -> KVCache:
        """An empty key/value cache with one slot per block."""
        return KVCache([None] * len(self.blocks))

    def _check_call(self, tokens: Tensor, cache: KVCache | None) -> int:
        """Validate the inputs; return the sequence position of the first new input."""
        if tokens.ndim != 2 or tokens.is_floating_point():
            raise ValueError(
                f"tokens: expected integer ids of shape (B, L) in raster order, "
                f"got {tokens.dtype} of shape {tuple(tokens.shape)}"
            )
        start = 0 if cache is None else cache.length
        if cache is not None and len(cache.layers) != len(self.blocks):
            raise ValueError(
                f"cache: has {len(cache.layers)} layers but the model has {len(self.blocks)}; "
                "make it with model.new_cache()"
            )
        if start and cache.batch != tokens.shape[0]:
            raise ValueError(f"tokens: batch {tokens.shape[0]} differs from the cache's batch {cache.batch}")
        if start and tokens.shape[1] == 0:
            raise ValueError("tokens: a non-empty cache needs at least one new token to continue from")
        end = start + tokens.shape[1] + (1 if start == 0 else 0)
        if end > self.config.num_tokens:
            raise ValueError(
                f"tokens: the sequence would reach {end} positions but the prior models "
                f"{self.config.num_tokens} (prior.grid {list(self.config.grid)}: prefix + N - 1 tokens); "
                "feed at most the first N - 1 tokens"
            )
        return start

    def forward(self, tokens: Tensor, labels: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, K) whose row j predicts token ``start + j``.

        Without a cache, or with an empty one, the input is the class prefix followed by ``tokens``
        (B, L), so T = L + 1 and row i predicts token i. With a non-empty cache, ``tokens`` are the
        tokens after those already cached (``labels`` are then ignored: the prefix is cached), T = L.
        The cache, when given, is extended in place.
        """
        start = self._check_call(tokens, cache)
        batch = tokens.shape[0]
        x = self.token_embedding(tokens)  # (B, L, C)
        if start == 0:
            prefix = self.class_embedding(labels, batch, tokens.device)  # (B, 1, C)
            x = torch.cat([prefix, x], dim=1)  # (B, 1 + L, C)
        x = self.dropout(x + self.position_embedding[:, start : start + x.shape[1]])
        for layer, block in enumerate(self.blocks):
            past = cache.layers[layer] if cache is not None else None
            x, present = block(x, causal=True, past=past)
            if cache is not None:
                cache.layers[layer] = present
        return self.head(self.norm(x))  # (B, T, K)


def gpt_loss(
    model: nn.Module, indices: Tensor, labels: Tensor | None = None, *, validated: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """Next-token cross-entropy over code indices (B, h, w) read in raster order.

    Returns the scalar loss (mean over all B * N tokens, with the config's label smoothing) and stats:
    ``loss`` and ``accuracy`` (of the argmax prediction). ``validated``: as for ``maskgit_loss``, the
    caller has range-checked indices and labels (the check is a device sync).
    """
    config = unwrap_model(model).config  # the module inside DDP or torch.compile
    if not validated:
        check_indices(indices, config.codebook_size)
        check_labels(labels, config.num_classes)
    targets = indices.flatten(1)  # (B, N)
    logits = model(targets[:, :-1], labels).float()  # (B, N, K): the prefix predicts token 0
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=config.label_smoothing)
    accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy}
