"""Pieces every quantizer shares: the output tuple, codebook statistics, the fast-path fallback."""

import logging
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)
T = TypeVar("T")

# Fast paths (compiled or Triton kernels) that failed in this process, by name, with the error: a
# default (not explicitly requested) fast path is not tried again after its first failure.
FAST_PATH_FAILURES: dict[str, str] = {}
# VQ's fused nearest-code search (search_triton) keeps a tile of latents in registers: code dimensions
# up to this one.
MAX_FUSED_DIM = 64


def under_dispatch_mode() -> bool:
    """Whether a Python dispatch mode (``FlopCounterMode``, ``FakeTensorMode``, debug modes) is active.

    Fast paths step aside inside one: compiled code cannot run there, and a Triton launch would hide
    its work from the mode, while the reference path's ops are exactly what the mode wants to see.
    """
    return _get_current_dispatch_mode() is not None


def run_fast_path(name: str, fast: Callable[[], T], fallback: Callable[[], T], *, requested: bool) -> T:
    """``fast()``; when it fails and was not ``requested`` explicitly: record, warn, ``fallback()``.

    Out-of-memory is never a reason to fall back (the reference path needs at least as much memory),
    and an explicitly requested fast path keeps its error, so the caller sees why it cannot run.
    Under a dispatch mode (``under_dispatch_mode``) the reference path runs, requested or not.
    """
    if under_dispatch_mode():
        return fallback()
    if requested:
        return fast()
    try:
        return fast()
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # no Triton, no compiler, an unsupported GPU: say so once, go on
        FAST_PATH_FAILURES[name] = repr(error)
        log.warning("%s unavailable (%r); using the reference path for the rest of this process", name, error)
        return fallback()


class QuantizerOutput(NamedTuple):
    """What every quantizer's ``forward(z)`` returns.

    codes: quantized latents, same shape as ``z`` (B, C, H, W), with straight-through gradients.
    indices: int64 code ids (B, H, W).
    loss: scalar auxiliary loss (0 for FSQ).
    stats: scalar tensors for logging (``perplexity``, ``usage``, plus quantizer-specific entries).
    """

    codes: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, Tensor]


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """Occurrences of every code id in ``indices`` (ids in [0, K)) as an int64 (K,) tensor.

    On CUDA and under ``torch.compile``: ``scatter_counts``. ``torch.bincount`` sizes its output from
    the data, so on CUDA it reads the largest id back to the host (a sync in every training step) and
    ``torch.compile`` has to break the graph around it. Elsewhere (eager on a CPU, where there is no
    device to wait for) bincount, which is about twice as fast there.
    """
    flat = indices.reshape(-1)
    if flat.is_cuda or torch.compiler.is_compiling():
        return scatter_counts(flat, codebook_size)
    return torch.bincount(flat, minlength=codebook_size)[:codebook_size]


def scatter_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """``code_counts`` as a scatter-add of ones into K bins: an output size fixed by K, no sync."""
    flat = indices.reshape(-1).long()
    ones = torch.ones((), dtype=torch.int64, device=flat.device).expand_as(flat)
    return torch.zeros(codebook_size, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, ones)


def code_histogram(indices: Tensor, codebook_size: int) -> Tensor:
    """Counts of every code id in ``indices`` as a float (K,) tensor."""
    return code_counts(indices, codebook_size).float()


def codebook_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Batch perplexity (exp of the code-distribution entropy) and the fraction of codes used."""
    counts = code_histogram(indices.detach(), codebook_size)
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {
        "perplexity": entropy.exp(),
        "usage": (counts > 0).float().mean(),
    }


def check_channels(z: Tensor, expected: int, name: str) -> None:
    """Raise a ValueError naming the argument when ``z`` is not (B, expected, H, W)."""
    if z.ndim != 4:
        raise ValueError(f"{name}: expected latents of shape (B, C, H, W), got shape {tuple(z.shape)}")
    if z.shape[1] != expected:
        raise ValueError(
            f"{name}: latent has {z.shape[1]} channels but the quantizer expects {expected}; "
            "project the encoder output to that many channels (or change the quantizer's dim/levels)"
        )


def check_indices(indices: Tensor, codebook_size: int) -> None:
    """Raise a ValueError naming the argument unless ``indices`` is an integer (B, H, W) tensor of code ids.

    The range check reads two values back from the device: a sync, paid only on the decode path.
    """
    if indices.ndim != 3:
        raise ValueError(f"indices: expected shape (B, H, W), got {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"indices: expected an integer tensor, got {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"indices: expected values in [0, {codebook_size}), the codebook size; got values from "
            f"{int(indices.min())} to {int(indices.max())}"
        )


def codes_from_codebook(indices: Tensor, codebook: Tensor) -> Tensor:
    """Channel-first codes (B, D, H, W) of integer indices (B, H, W) in a (K, D) codebook, in float32."""
    check_indices(indices, codebook.shape[0])
    with torch.autocast(device_type=indices.device.type, enabled=False):
        codes = torch.nn.functional.embedding(indices.long(), codebook)  # (B, H, W, D)
    return codes.permute(0, 3, 1, 2)


def channel_index(digits: Tensor, weights: list[float]) -> Tensor:
    """Int64 indices (B, H, W) of integer-valued float digits (B, C, H, W): sum of digit * weight per
    channel as one float32 multiply-add each, cast once (exact while the largest index is below
    2^24). FSQ, residual FSQ and LFQ index their codes this way."""
    index = digits[:, 0] * weights[0]
    for channel in range(1, len(weights)):
        index = index.add_(digits[:, channel], alpha=weights[channel])
    return index.long()


def require(ok: bool, name: str, allowed: str, value: object) -> None:
    """Raise a ValueError naming the argument and its allowed range unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}: expected {allowed}, got {value!r}")


def track_initialization(module: nn.Module) -> None:
    """Let ``initialization_pending`` answer for ``module`` (which holds an ``initialized`` buffer).

    Call once in ``__init__``. ``load_state_dict`` makes it read the buffer again, since a loaded
    state may be initialised or not.
    """
    module._initialized_seen = False
    module.register_load_state_dict_post_hook(_forget_initialized)


def _forget_initialized(module: nn.Module, incompatible_keys: object) -> None:
    module._initialized_seen = False


def initialization_pending(module: nn.Module) -> bool:
    """Whether ``module``'s data-dependent initialisation has yet to run (``initialized`` is False).

    The buffer is read (a host sync on an accelerator, a graph break under ``torch.compile``) only
    until it is found True; from then on a Python flag answers, so a training step after the first
    pays for neither. Writing False into the buffer directly goes unseen: load a state instead.
    """
    if module._initialized_seen:
        return False
    module._initialized_seen = bool(module.initialized)
    return not module._initialized_seen


def mark_initialized(module: nn.Module) -> None:
    """Record that ``module``'s initialisation ran, in its ``initialized`` buffer and for
    ``initialization_pending``."""
    module.initialized.fill_(True)
    module._initialized_seen = True
