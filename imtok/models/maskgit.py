"""MaskGIT prior (Chang, Zhang, Jiang, Liu, Freeman, CVPR 2022): a bidirectional transformer over tokens.

Training. Each image's token grid is flattened in raster order (N = h * w tokens). Per sample a
ratio r = cos(pi/2 * u), u ~ U(0, 1), is drawn from the cosine schedule and ceil(r * N) positions
(at least one), chosen uniformly at random, are replaced by the extra MASK id (= codebook_size).
The transformer sees every position at once and is trained with cross-entropy (with label smoothing)
on the masked positions only: unmasked tokens are inputs, never targets.

Conditioning. The class enters as one prefix token taken from a table of num_classes + 1 rows; the
last row is the null class, used for unconditional models, for ``labels=None`` and, in training
mode, in place of a fraction ``label_dropout`` of the labels, so that one network gives both the
conditional and the unconditional logits that classifier-free guidance mixes at sampling time.

Architecture. Token embeddings (codebook_size + 1 rows: the codes and MASK) plus learned positional
embeddings, ``depth`` pre-norm blocks (LayerNorm -> multi-head self-attention through
``F.scaled_dot_product_attention`` -> residual, LayerNorm -> GELU MLP -> residual), a final LayerNorm
and a linear head over the codebook_size codes (MASK is never predicted).

The transformer pieces here (``TransformerBlock``, ``ClassEmbedding``, ``init_transformer_weights``,
``PriorConfig``) are shared with the autoregressive prior in ``imtok.models.gpt``, which runs the
same blocks causally with a key/value cache.

Decoding (iterative parallel sampling) is ``imtok.sampling.maskgit_decode``; a ``MaskGIT`` instance is
itself the ``tokens_to_logits(tokens, labels)`` callable it takes.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtok.models.architecture import PriorArchitecture, raise_first_failed
from imtok.quantizers.common import check_indices
from imtok.training import unwrap_model

# Standard deviation of the truncated-normal init of every linear, embedding and positional weight
# (BERT, GPT-2 and the MaskGIT reference code all use 0.02); truncated at two standard deviations.
INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------------
# Configuration shared by the priors


def grid_tuple(grid: Any, prefix: str = "prior") -> tuple[int, ...]:
    """``grid`` as a tuple (a YAML list works), or a ValueError naming ``prefix.grid``."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
        raise ValueError(f"{prefix}.grid: expected the token grid as a list [h, w], got {grid!r}")
    return tuple(grid)


@dataclass(frozen=True, kw_only=True)
class PriorConfig(PriorArchitecture):
    """Shape of a prior (MaskGIT, GPT): the transformer (``PriorArchitecture``, shared with the params)
    and what comes from the tokenizer and the shards, checked here."""

    codebook_size: int  # K: token ids 0..K-1 (MaskGIT's MASK id is K)
    grid: tuple[int, int]  # token grid (h, w); GPT reads it in raster order
    num_classes: int = 0  # 0: unconditional

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", grid_tuple(self.grid))
        super().__post_init__()
        grid = self.grid
        checks = [
            (self.codebook_size >= 2, "codebook_size", f"expected an integer >= 2, got {self.codebook_size}"),
            (
                len(grid) == 2 and all(isinstance(side, int) and side >= 1 for side in grid),
                "grid",
                f"expected the token grid as two integers [h, w] >= 1 (the tokenizer's grid), got {grid!r}",
            ),
            (
                self.num_classes >= 0,
                "num_classes",
                f"expected an integer >= 0 (0 for an unconditional prior), got {self.num_classes}",
            ),
        ]
        raise_first_failed("prior", checks)

    @property
    def num_tokens(self) -> int:
        """Tokens per image, h * w (GPT: also its longest sequence, prefix + N - 1 tokens)."""
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True, kw_only=True)
class MaskGITConfig(PriorConfig):
    """Shape of the MaskGIT prior."""

    @property
    def mask_id(self) -> int:
        """The id of the MASK token: one past the last code."""
        return self.codebook_size


# ---------------------------------------------------------------------------------------------------
# Transformer pieces (shared with the GPT prior)


def attention_mask(queries: int, keys: int, causal: bool, device: torch.device) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for scaled_dot_product_attention.

    With a key/value cache the ``queries`` new positions are the last ones of the ``keys``: query i may
    see keys up to ``keys - queries + i``. SDPA's ``is_causal`` aligns the mask to the top-left instead,
    so it is used only when there is no cached prefix; one query sees every key and needs no mask.
    """
    if not causal or queries == 1:
        return None, False
    if queries == keys:
        return None, True
    allowed = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)
    return allowed, False


class SelfAttention(nn.Module):
    """Multi-head self-attention; optionally causal and continuing from cached keys and values."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, causal: bool = False, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend ``x`` (B, T, C); return the output and the keys and values of all positions so far."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, S, hs), S = cached + T
            v = torch.cat([past[1], v], dim=2)
        mask, is_causal = attention_mask(length, k.shape[2], causal, x.device)
        dropout = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        h = h.transpose(1, 2).reshape(batch, length, dim)  # (B, T, C)
        return self.proj_dropout(self.proj(h)), (k, v)


class MLP(nn.Module):
    """Two linear layers with a GELU between, widening by ``mlp_ratio``."""

    def __init__(self, dim: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(
        self, x: Tensor, causal: bool = False, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Transform ``x`` (B, T, C); also return this layer's keys and values (for a cache)."""
        h, present = self.attn(self.norm1(x), causal, past)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x, present


class ClassEmbedding(nn.Module):
    """Class prefix token: a table of num_classes + 1 rows, the last one the null class.

    ``labels=None`` and unconditional priors (num_classes = 0) use the null class for every sample;
    in training mode each label is replaced by the null class with probability ``label_dropout``.
    """

    def __init__(self, num_classes: int, dim: int, label_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        """Row of the null (unconditional) class."""
        return self.num_classes

    def class_ids(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """The int64 (B,) rows used for ``labels``, after label dropout in training mode."""
        null = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        if labels is None:
            return null
        if self.num_classes == 0:
            raise ValueError("labels: the prior is unconditional (prior.num_classes = 0); pass labels=None")
        if labels.shape != (batch,) or labels.is_floating_point():
            raise ValueError(
                f"labels: expected an integer tensor of shape ({batch},), one class per sample, "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        labels = labels.to(device=device, dtype=torch.long)
        if self.training and self.label_dropout > 0:
            dropped = torch.rand(batch, device=device) < self.label_dropout
            labels = torch.where(dropped, null, labels)
        return labels

    def forward(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Prefix embeddings (B, 1, C)."""
        return self.table(self.class_ids(labels, batch, device)).unsqueeze(1)


def check_labels(labels: Tensor | None, num_classes: int) -> None:
    """Raise a ValueError unless ``labels`` is None or holds classes in [0, num_classes] (reads them back)."""
    if labels is None or labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > num_classes:
        raise ValueError(
            f"labels: expected classes in [0, {num_classes}) (or {num_classes}, the null class) for "
            f"prior.num_classes={num_classes}, got values from {low} to {high}"
        )


def init_transformer_weights(model: nn.Module, depth: int) -> None:
    """Truncated-normal(0, INIT_STD) weights, zero biases, LayerNorm at identity.

    The output projections of attention and MLP (the layers that write into the residual stream) get
    INIT_STD / sqrt(2 * depth), as in GPT-2, so the residual stream's variance does not grow with depth.
    """
    residual_std = INIT_STD / math.sqrt(2 * depth)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith(("attn.proj", "mlp.fc2")) else INIT_STD
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def positional_embedding(length: int, dim: int) -> nn.Parameter:
    """Learned positional embeddings (1, length, dim), truncated-normal initialised."""
    weight = torch.empty(1, length, dim)
    nn.init.trunc_normal_(weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
    return nn.Parameter(weight)


# ---------------------------------------------------------------------------------------------------
# The MaskGIT model and its loss


def mask_ratio(u: Tensor | float) -> Tensor | float:
    """The cosine schedule: fraction of tokens masked at progress ``u`` in [0, 1], cos(pi/2 * u)."""
    if isinstance(u, Tensor):
        return torch.cos(u * (math.pi / 2))
    return math.cos(u * math.pi / 2)


class MaskGIT(nn.Module):
    """Bidirectional transformer: logits over the codebook at every position of a masked token grid."""

    def __init__(self, config: MaskGITConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_dim
        self.token_embedding = nn.Embedding(config.codebook_size + 1, dim)  # the codes and MASK
        self.class_embedding = ClassEmbedding(config.num_classes, dim, config.label_dropout)
        self.position_embedding = positional_embedding(1 + config.num_tokens, dim)  # prefix + grid
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config.codebook_size)
        init_transformer_weights(self, config.depth)

    @property
    def mask_id(self) -> int:
        """The MASK token id (= codebook_size)."""
        return self.config.mask_id

    @property
    def null_class(self) -> int:
        """The class id of the unconditional (null) class (= num_classes)."""
        return self.class_embedding.null_class

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise a ValueError unless ``tokens`` is an integer (B, h, w) tensor on the configured grid."""
        h, w = self.config.grid
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (h, w) or tokens.is_floating_point():
            raise ValueError(
                f"tokens: expected integer ids of shape (B, {h}, {w}) for prior.grid={[h, w]}, "
                f"got {tokens.dtype} of shape {tuple(tokens.shape)}"
            )

    def forward(
        self, tokens: Tensor, labels: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """Logits (B, h, w, K) for token ids (B, h, w) holding MASK (= K) where the token is unknown.

        With ``positions`` (bool (B, h, w)) only those positions get logits, (M, K) in the order of
        ``tokens[positions]``: the head over K codes, the largest layer for a big codebook, then runs
        on the M scored positions alone, and no (B, h, w, K) tensor is built or scattered back into.
        """
        self.check_tokens(tokens)
        batch, h, w = tokens.shape
        if positions is not None and (positions.dtype != torch.bool or positions.shape != tokens.shape):
            raise ValueError(
                f"positions: expected a bool mask of the tokens' shape {tuple(tokens.shape)}, "
                f"got {positions.dtype} of shape {tuple(positions.shape)}"
            )
        x = self.token_embedding(tokens.flatten(1))  # (B, N, C)
        prefix = self.class_embedding(labels, batch, tokens.device)  # (B, 1, C)
        x = torch.cat([prefix, x], dim=1) + self.position_embedding  # (B, 1 + N, C)
        x = self.dropout(x)
        for block in self.blocks:
            x, _ = block(x)
        hidden = x[:, 1:]  # (B, N, C): the prefix predicts nothing
        if positions is not None:
            return self.head(self.norm(hidden[positions.flatten(1)]))  # (M, K)
        return self.head(self.norm(hidden)).view(batch, h, w, -1)


def random_token_mask(
    batch: int, num_tokens: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Boolean (B, N) training mask: per sample ceil(cos(pi/2 * u) * N) positions, u ~ U(0, 1), at least 1.

    The positions are a uniformly random subset of that size (the ranks of i.i.d. uniform scores).
    """
    u = torch.rand(batch, device=device, generator=generator)
    counts = torch.ceil(mask_ratio(u) * num_tokens).long().clamp(1, num_tokens)  # (B,)
    scores = torch.rand(batch, num_tokens, device=device, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, N): a random permutation per sample
    return ranks < counts.unsqueeze(1)


def masked_token_loss(
    logits: Tensor, targets: Tensor, mask: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy and accuracy over the positions where ``mask`` is True; the rest are ignored.

    targets and mask (...); logits (..., K) for every position, or (M, K) for the M masked ones alone
    (in the order of ``targets[mask]``, as ``MaskGIT.forward(..., positions=mask)`` returns them).
    The loss is the mean over all masked tokens of the batch.
    """
    wanted = targets[mask]  # (M,)
    if logits.shape[:-1] == mask.shape:
        logits = logits[mask]
    elif logits.ndim != 2 or logits.shape[0] != wanted.shape[0]:
        raise ValueError(
            f"logits: expected (..., K) over the mask's shape {tuple(mask.shape)} or ({wanted.shape[0]}, K) "
            f"for its masked positions, got {tuple(logits.shape)}"
        )
    selected = logits.float()  # (M, K)
    loss = F.cross_entropy(selected, wanted, label_smoothing=label_smoothing)
    accuracy = (selected.detach().argmax(dim=-1) == wanted).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy}


def maskgit_loss(
    model: nn.Module,
    indices: Tensor,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    validated: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MaskGIT training loss on code indices (B, h, w): mask by the cosine schedule, predict the masked.

    Returns the scalar loss and stats: ``loss``, ``accuracy`` (on masked tokens) and ``mask_ratio``
    (fraction of tokens masked in the batch). ``generator`` (on the indices' device) draws the masks;
    label dropout inside the model uses the global RNG, as dropout does. ``validated``: the caller has
    range-checked the indices and labels already (a trainer checks its whole split once); the check
    reads values back from the device, a sync a training step should not pay.
    """
    config = unwrap_model(model).config  # the module inside DDP or torch.compile
    if not validated:
        check_indices(indices, config.codebook_size)
        check_labels(labels, config.num_classes)
    batch, h, w = indices.shape
    mask = random_token_mask(batch, h * w, indices.device, generator).view(batch, h, w)
    inputs = indices.masked_fill(mask, config.mask_id)
    logits = model(inputs, labels, positions=mask)  # (M, K): the masked positions only
    loss, stats = masked_token_loss(logits, indices, mask, config.label_smoothing)
    stats["mask_ratio"] = mask.float().mean()
    return loss, stats
