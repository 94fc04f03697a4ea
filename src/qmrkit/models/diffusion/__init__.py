"""Diffusion models (each a :class:`qmrkit.fit.Model`) and the signal summaries they are fitted to.

b-values in ms/µm², diffusivities in µm²/ms, times (δ, Δ) in ms, rates in 1/ms.
"""

from .axcaliber import AxCaliberSMT
from .compartments import axisymmetric_spherical_mean, stick_spherical_mean
from .dki import DKI, dki_wls, kurtosis_maps
from .dti import DTI, dti_wls, tensor_eig, tensor_from_cholesky, tensor_maps
from .invariants import Invariants, Shell, find_shells, real_sh, rotational_invariants
from .nexi import NEXI, karger_signal, karger_signal_and_derivatives, n_nodes_for
from .restricted import (
    cylinder_attenuation,
    cylinder_deff,
    gpa_deff,
    gpa_roots,
    sphere_attenuation,
    sphere_deff,
)
from .sandi import SANDI

__all__ = [
    "DTI",
    "DKI",
    "dki_wls",
    "kurtosis_maps",
    "NEXI",
    "karger_signal",
    "karger_signal_and_derivatives",
    "n_nodes_for",
    "AxCaliberSMT",
    "SANDI",
    "axisymmetric_spherical_mean",
    "stick_spherical_mean",
    "gpa_deff",
    "gpa_roots",
    "cylinder_deff",
    "sphere_deff",
    "cylinder_attenuation",
    "sphere_attenuation",
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
