"""Simulation: numerical phantoms, noise, synthetic series (used by tests, demos and benchmarks)."""

from .noise import add_noise
from .phantoms import CARDIAC_TISSUES, cardiac_phantom, nist_phantom
from .relaxometry import MOLLI_TI, molli_series

__all__ = [
    "cardiac_phantom",
    "nist_phantom",
    "CARDIAC_TISSUES",
    "add_noise",
    "molli_series",
    "MOLLI_TI",
]
