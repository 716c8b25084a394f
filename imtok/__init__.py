"""imtok: discrete image tokenizers (FSQ, VQ, Regularized VQ) and the priors that generate from them."""

__version__ = "0.1.0"
