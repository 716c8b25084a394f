"""Quantizers sharing one interface: ``forward(z) -> (codes, indices, loss, stats)``."""

from imtok.quantizers.common import QuantizerOutput
from imtok.quantizers.fsq import FSQ

__all__ = ["FSQ", "QuantizerOutput"]
