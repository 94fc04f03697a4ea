"""End-to-end functions (raw scan or series → maps/images); the server and CLI call these."""

from .calibration import noise_statistics
from .series import fit_maps

__all__ = ["fit_maps", "noise_statistics"]
