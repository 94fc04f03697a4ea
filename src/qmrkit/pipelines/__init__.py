"""End-to-end functions (raw scan or series → maps/images); the server and CLI call these."""

from .calibration import noise_statistics
from .diffusion import MCMC_PRESETS, DiffusionMaps, diffusion_maps
from .masking import ObjectMask, object_mask
from .mrf import MrfMaps, b1_grid, default_dictionary, mrf_image_size, mrf_maps
from .series import fit_maps

__all__ = [
    "fit_maps",
    "diffusion_maps",
    "MCMC_PRESETS",
    "DiffusionMaps",
    "noise_statistics",
    "mrf_maps",
    "mrf_image_size",
    "MrfMaps",
    "default_dictionary",
    "b1_grid",
    "object_mask",
    "ObjectMask",
]
