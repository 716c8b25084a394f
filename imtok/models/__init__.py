"""Models: the image tokenizer (encoder, quantizer, decoder) and the token priors (MaskGIT, GPT)."""

from imtok.models.autoencoder import Tokenizer, TokenizerConfig, build_quantizer

__all__ = ["Tokenizer", "TokenizerConfig", "build_quantizer"]
