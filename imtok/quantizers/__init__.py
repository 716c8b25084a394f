"""Quantizers sharing one interface: ``forward(z) -> (codes, indices, loss, stats)``."""

from imtok.quantizers.common import QuantizerOutput
from imtok.quantizers.fsq import FSQ
from imtok.quantizers.regvq import RegularizedVQ
from imtok.quantizers.vq import VectorQuantizer

__all__ = ["FSQ", "QuantizerOutput", "RegularizedVQ", "VectorQuantizer"]
