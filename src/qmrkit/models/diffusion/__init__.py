"""Diffusion models (each a :class:`qmrkit.fit.Model`) and the signal summaries they are fitted to.

b-values in ms/µm², diffusivities in µm²/ms, times (δ, Δ) in ms, rates in 1/ms.
"""

from .dti import DTI, dti_wls, tensor_eig, tensor_from_cholesky, tensor_maps
from .invariants import Invariants, Shell, find_shells, real_sh, rotational_invariants
from .nexi import NEXI, karger_signal, karger_signal_and_derivatives, n_nodes_for

__all__ = [
    "DTI",
    "NEXI",
    "karger_signal",
    "karger_signal_and_derivatives",
    "n_nodes_for",
    "dti_wls",
    "tensor_eig",
    "tensor_from_cholesky",
    "tensor_maps",
    "Invariants",
    "Shell",
    "find_shells",
    "real_sh",
    "rotational_invariants",
]
