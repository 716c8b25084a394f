"""Models: the image tokenizer (encoder, quantizer, decoder), the token priors (MaskGIT, GPT), the domain
classifier, and their files (``imtok.models.files``)."""
