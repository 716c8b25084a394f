"""Models: the image tokenizer (encoder, quantizer, decoder)."""

from imtok.models.autoencoder import Tokenizer, TokenizerConfig, build_quantizer

__all__ = ["Tokenizer", "TokenizerConfig", "build_quantizer"]
