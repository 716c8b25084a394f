"""Models: the image tokenizer (encoder, quantizer, decoder) and the token priors (MaskGIT, GPT)."""

from imtok.models.autoencoder import Tokenizer, TokenizerConfig, build_quantizer
from imtok.models.gpt import GPT, GPTConfig, KVCache, gpt_loss
from imtok.models.maskgit import MaskGIT, MaskGITConfig, mask_ratio, maskgit_loss

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "MaskGIT",
    "MaskGITConfig",
    "Tokenizer",
    "TokenizerConfig",
    "build_quantizer",
    "gpt_loss",
    "mask_ratio",
    "maskgit_loss",
]
