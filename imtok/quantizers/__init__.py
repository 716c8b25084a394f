"""Quantizers sharing one interface: ``forward(z) -> (codes, indices, loss, stats)``."""

from imtok.quantizers.bsq import BSQ
from imtok.quantizers.common import QuantizerOutput
from imtok.quantizers.fsq import FSQ
from imtok.quantizers.lfq import LFQ
from imtok.quantizers.regvq import RegularizedVQ
from imtok.quantizers.residual_fsq import ResidualFSQ
from imtok.quantizers.simvq import SimVQ
from imtok.quantizers.vq import VectorQuantizer

__all__ = ["BSQ", "FSQ", "LFQ", "QuantizerOutput", "RegularizedVQ", "ResidualFSQ", "SimVQ", "VectorQuantizer"]
