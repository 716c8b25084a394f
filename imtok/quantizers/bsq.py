"""Binary spherical quantization (BSQ; Zhao et al. 2024): LFQ on the unit sphere.

Latents are first projected onto the unit sphere, u = x / ||x||, then each channel is its sign scaled
by 1/sqrt(d): codes are the 2^d corners of a hypercube inscribed in the sphere, every code at unit
norm, so the quantization error is bounded whatever the encoder's scale. The index, the entropy terms
(with code magnitude 1/sqrt(d) in the soft assignment) and the commitment term are LFQ's
(``imtok.quantizers.lfq``); for large codebooks the paper's factorised codebook entropy is what
``exact_entropy=False`` (the default above ``MAX_EXACT_ENTROPY_CODES``) computes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from imtok.quantizers.lfq import LFQ


class BSQ(LFQ):
    """Binary spherical quantizer of ``dim`` channels: 2^dim codes in {-1/sqrt(dim), +1/sqrt(dim)}^dim,
    quantizing the latents' directions. Options as ``LFQ``."""

    spherical = True

    def project(self, latents: Tensor) -> Tensor:
        return F.normalize(latents, dim=1)  # (B, d, H, W): unit length over the channels
