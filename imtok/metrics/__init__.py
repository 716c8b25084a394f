"""Metrics: reconstruction (``recon``: PSNR, SSIM), codebook (``codebook``: usage, perplexity), samples
(``fid``: FID, precision/recall), and the feature networks they use (``features``, ``inception``)."""
