"""Solvers on linear operators (no MRI physics): CG, least squares, FISTA, PDHG, operator norms.

Every solver is device-agnostic (it runs where its inputs live), takes ``max_iter``, ``tol`` and
a ``callback``, and returns a :class:`SolverResult` with the solution, the iteration count, the
history of its stopping quantity, a convergence flag and the elapsed time. Proximal operators
for FISTA and PDHG are in :mod:`qmrkit.optim.prox`.
"""

from . import prox
from ._common import SolverResult
from .cg import cg
from .fista import fista
from .lanczos import lanczos_max_eig
from .lsqr import lsqr
from .pdhg import PdhgResult, pdhg
from .power import power_iteration

__all__ = [
    "SolverResult",
    "PdhgResult",
    "cg",
    "lsqr",
    "fista",
    "pdhg",
    "power_iteration",
    "lanczos_max_eig",
    "prox",
]
