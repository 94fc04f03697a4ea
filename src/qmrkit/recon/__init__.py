"""Image reconstruction from raw k-space: coil handling, CG-SENSE, TV (PDHG), gridding and the
GACELLE-style gradient-descent route, all built on :mod:`qmrkit.ops` and :mod:`qmrkit.optim`.

>>> from qmrkit import recon, sim
>>> maps = recon.espirit(kdata, calib=24)                 # (coils, ny, nx)
>>> res = recon.sense(kdata, maps, mask=mask, max_iter=30)  # ReconResult
>>> res.image.shape, res.iterations

Conventions: k-space ``(*batch, coils, *k)``, images ``(*batch, *spatial)``, trajectories in
cycles/pixel ``[-0.5, 0.5)``. See ``docs/recon.md``.
"""

from ._ops import encoding_operator as operator
from .coils import (
    coil_compress,
    espirit,
    low_resolution_images,
    noise_covariance,
    prewhiten,
    rss,
    walsh,
)
from .result import ReconResult
from .scan import reconstruct
from .sense import gridding, sense, tv
from .sgd import sgd

__all__ = [
    "ReconResult",
    "rss",
    "walsh",
    "espirit",
    "low_resolution_images",
    "noise_covariance",
    "prewhiten",
    "coil_compress",
    "sense",
    "tv",
    "gridding",
    "sgd",
    "operator",
    "reconstruct",
]
