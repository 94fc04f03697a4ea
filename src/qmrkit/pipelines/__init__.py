"""End-to-end functions (raw scan or series → maps/images); the server and CLI call these.

The names below are imported from their modules on first use (module ``__getattr__``), so that
``qmrkit.pipelines.masking`` — which ``qmrkit fit`` needs — does not pull in the raw-data
reconstruction (``calibration`` → ``qmrkit.recon`` → ``qmrkit.sim``), the diffusion or the MRF
pipelines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from .calibration import noise_statistics
    from .diffusion import MCMC_PRESETS, DiffusionMaps, diffusion_maps
    from .masking import ObjectMask, object_mask
    from .mrf import MrfMaps, b1_grid, default_dictionary, mrf_image_size, mrf_maps
    from .series import fit_maps

# public name -> the submodule defining it
_EXPORTS = {
    "fit_maps": "series",
    "diffusion_maps": "diffusion",
    "MCMC_PRESETS": "diffusion",
    "DiffusionMaps": "diffusion",
    "noise_statistics": "calibration",
    "mrf_maps": "mrf",
    "mrf_image_size": "mrf",
    "MrfMaps": "mrf",
    "default_dictionary": "mrf",
    "b1_grid": "mrf",
    "object_mask": "masking",
    "ObjectMask": "masking",
}

__all__ = [  # literal, so that linters see the TYPE_CHECKING imports as the public API
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
# submodules, reachable as attributes as when this file imported them all
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _EXPORTS.values(), __all__)
