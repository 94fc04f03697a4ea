"""Auto-tuned non-uniform FFT (NUFFT): plan once, execute many times.

>>> import torch
>>> from qmrkit import nufft
>>> traj = nufft.golden_angle_radial(64, 128)          # (M, 2), cycles/pixel in [-0.5, 0.5)
>>> op = nufft.plan(traj, (64, 64), eps=1e-3, batch=8)  # chooses backend, method, σ, W
>>> y = op(torch.randn(8, 64, 64, dtype=torch.complex64))  # (8, M) samples
>>> x = op.H(y)                                          # (8, 64, 64) adjoint
>>> op.info.backend, op.info.kernel_width                # what was chosen (and op.info.reason)

Convention: ``y_m = Σ_r x_r exp(−2πi k_m·r)`` with the centred image index ``r = n − N//2``,
unnormalised; the adjoint is its exact conjugate transpose. See ``docs/nufft.md``.
"""

from .dcf import density_compensation
from .kernels import Kernel
from .plan import NufftInfo, NufftPlan, default_memory_budget, plan
from .planner import forget_wisdom, wisdom_path
from .trajectories import (
    from_ismrmrd,
    from_radians,
    golden_angle_radial,
    radial,
    radial_3d,
    spiral,
    stack_of_stars,
    to_radians,
)

__all__ = [
    "plan",
    "NufftPlan",
    "NufftInfo",
    "Kernel",
    "density_compensation",
    "radial",
    "golden_angle_radial",
    "spiral",
    "stack_of_stars",
    "radial_3d",
    "from_radians",
    "to_radians",
    "from_ismrmrd",
    "wisdom_path",
    "forget_wisdom",
    "default_memory_budget",
]
