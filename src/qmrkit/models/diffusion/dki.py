"""Diffusion kurtosis imaging (Jensen 2005): ``log S = log S0 − b·gᵀDg + (b²/6)·MD²·W(g)``.

``D`` is the diffusion tensor (µm²/ms) and ``W`` the fourth-order kurtosis tensor (dimensionless);
``W(g) = Σ W_ijkl g_i g_j g_k g_l``. The signal's log is linear in the six entries of D and the
15 unique entries of ``A = MD²·W`` (µm⁴/ms²), which are what the model fits (as DIPY's linear
fits do); ``W = A/MD²`` follows.

Maps (all in the frame of the b-vectors): FA, MD, AD, RD, L1–L3 (µm²/ms), V1x/V1y/V1z, and the
kurtoses of the apparent kurtosis ``K(n) = A(n)/(nᵀDn)²`` (= MD²·W(n)/D(n)²):

* MK: the mean of K(n) over the sphere (Gauss–Legendre × uniform-azimuth quadrature,
  :data:`MK_NODES`; Tabesh 2011's closed form is the same average);
* AK: K(e1), along the principal eigenvector;
* RK: the mean of K(n) over the circle perpendicular to e1 (:data:`RK_NODES` points).

Unlike DIPY, the kurtosis maps are not clipped to [−3/7, 10]; implausible values are left visible.
The start (:meth:`DKI.initial_guess`) is DIPY's WLS: an ordinary least-squares fit of log S, then
one fit weighted by the squared OLS-predicted signal; ``fit.lm`` refines it (NLLS on S).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations_with_replacement
from math import factorial
from typing import Any

import numpy as np
import torch

from ...errors import ParameterError, ShapeError
from ...fit.model import Model, Parameter
from ...io.dwi import B0_THRESHOLD, check_gradients
from .dti import DTI, MIN_SIGNAL, _lstsq, _tensor_from_six, tensor_eig, tensor_maps

#: the six D entries, in design-matrix order
D_NAMES = ("Dxx", "Dyy", "Dzz", "Dxy", "Dxz", "Dyz")
_D_INDEX = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))

#: the 15 unique index multisets of W, as powers (nx, ny, nz) with nx + ny + nz = 4
W_POWERS = tuple(
    tuple(c.count(a) for a in range(3)) for c in combinations_with_replacement(range(3), 4)
)
#: parameter names of A = MD²·W, e.g. "Axxxy"
A_NAMES = tuple("A" + "x" * p[0] + "y" * p[1] + "z" * p[2] for p in W_POWERS)
#: multiplicity of each unique entry in the full symmetric sum (4!/(nx! ny! nz!))
W_MULTIPLICITY = tuple(
    factorial(4) // (factorial(p[0]) * factorial(p[1]) * factorial(p[2])) for p in W_POWERS
)

#: quadrature of the MK sphere average: Gauss–Legendre nodes in cos θ × uniform azimuths
MK_NODES = (48, 96)
#: points on the half circle (K(n) = K(−n)) of the RK average
RK_NODES = 96
#: voxels per chunk of the kurtosis averages
KURTOSIS_CHUNK = 4096


def _monomials(g: torch.Tensor) -> torch.Tensor:
    """(…, 15): multiplicity·g_x^nx·g_y^ny·g_z^nz for each unique W entry."""
    cols = [
        m * g[..., 0] ** p[0] * g[..., 1] ** p[1] * g[..., 2] ** p[2]
        for p, m in zip(W_POWERS, W_MULTIPLICITY, strict=True)
    ]
    return torch.stack(cols, -1)


def _quadratic(g: torch.Tensor) -> torch.Tensor:
    """(…, 6): g_i g_j (doubled off the diagonal) in :data:`D_NAMES` order."""
    return torch.stack([(1 if i == j else 2) * g[..., i] * g[..., j] for i, j in _D_INDEX], -1)


def dki_design_matrix(b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Log-linear DKI design ``(n, 22)``: log S = X·[D (6), A (15), log S0].

    Parameters
    ----------
    b : (n,) ms/µm²; g : (n, 3) unit directions (zero rows allowed for b = 0).
    """
    return torch.cat(
        [
            -b[:, None] * _quadratic(g),
            (b * b / 6.0)[:, None] * _monomials(g),
            torch.ones_like(b)[:, None],
        ],
        dim=1,
    )


def dki_wls(
    b: torch.Tensor, g: torch.Tensor, data: torch.Tensor, *, weighted: bool = True
) -> torch.Tensor:
    """DIPY's linear DKI fit: OLS of log S, then WLS weighted by the squared OLS prediction.

    Parameters
    ----------
    b : (n,) ms/µm²; g : (n, 3); data : (V, n) positive signal.

    Returns
    -------
    (V, 22) float64: D (6, µm²/ms), A = MD²·W (15, µm⁴/ms²), log S0.
    """
    x = dki_design_matrix(b.to(torch.float64), g.to(torch.float64))
    d = data.to(torch.float64)
    floor = MIN_SIGNAL * d.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    y = torch.log(torch.maximum(d, floor))
    beta = _lstsq(x, y, None)
    if weighted:
        beta = _lstsq(x, y, torch.exp(beta @ x.T))
    return beta


def _sphere_nodes(dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    n_t, n_p = MK_NODES
    x, w = np.polynomial.legendre.leggauss(n_t)
    phi = 2 * np.pi * (np.arange(n_p) + 0.5) / n_p
    ct, ph = np.meshgrid(x, phi, indexing="ij")
    st = np.sqrt(1 - ct * ct)
    dirs = np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3)
    wts = np.repeat(w, n_p) / (2.0 * n_p)  # sums to 1
    kw = {"dtype": dtype, "device": device}
    return torch.as_tensor(dirs, **kw), torch.as_tensor(wts, **kw)


def apparent_kurtosis(d6: torch.Tensor, a15: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """K(n) = A(n)/(nᵀDn)² for directions ``n (V, m, 3)`` (or ``(m, 3)``), D ``(V, 6)``,
    A ``(V, 15)``; returns (V, m)."""
    q = _quadratic(n)
    mono = _monomials(n)
    if n.ndim == 2:
        dn = d6 @ q.T
        an = a15 @ mono.T
    else:
        dn = (q * d6[:, None]).sum(-1)
        an = (mono * a15[:, None]).sum(-1)
    return an / (dn * dn).clamp_min(torch.finfo(dn.dtype).tiny)


def kurtosis_maps(d6: torch.Tensor, a15: torch.Tensor) -> dict[str, torch.Tensor]:
    """MK, AK, RK (V,) from D ``(V, 6)`` and A ``(V, 15)`` (module docs)."""
    dirs, wts = _sphere_nodes(d6.dtype, d6.device)
    t = torch.linspace(0, np.pi, RK_NODES + 1, dtype=d6.dtype, device=d6.device)[:-1]
    out: dict[str, list[torch.Tensor]] = {"MK": [], "AK": [], "RK": []}
    for s in range(0, d6.shape[0], KURTOSIS_CHUNK):
        d, a = d6[s : s + KURTOSIS_CHUNK], a15[s : s + KURTOSIS_CHUNK]
        out["MK"].append(apparent_kurtosis(d, a, dirs) @ wts)
        _, vecs = tensor_eig(_tensor_from_six(d))
        e1, e2, e3 = vecs[..., 0], vecs[..., 1], vecs[..., 2]
        out["AK"].append(apparent_kurtosis(d, a, e1[:, None])[:, 0])
        circ = torch.cos(t)[None, :, None] * e2[:, None] + torch.sin(t)[None, :, None] * e3[:, None]
        out["RK"].append(apparent_kurtosis(d, a, circ).mean(-1))
    return {k: torch.cat(v) for k, v in out.items()}


class DKI(Model):
    """Diffusion kurtosis: S = S0·exp(−b·gᵀDg + (b²/6)·A(g)), A = MD²·W (module docs).

    Parameters
    ----------
    bvals : (n,) b-values in ms/µm² (``DWI.bvals``); at least two non-zero b-values
        (typically 1 and 2 ms/µm²) and 15 directions.
    bvecs : (n, 3) unit directions (``DWI.bvecs``, FSL's frame).

    Notes
    -----
    Parameters: ``S0``, the six D entries ``Dxx … Dyz`` (µm²/ms) and the 15 entries ``Axxxx …``
    of MD²·W (µm⁴/ms²). Derived maps: FA, MD, AD, RD, L1–L3, V1x–V1z, MK, AK, RK.
    """

    name = "dki"
    measurement_axis = "diffusion-weighted volumes (bvals, bvecs)"
    parameters = (
        Parameter("S0", 0.0, 10.0, "a.u.", amplitude=True, description="signal at b = 0"),
        *(
            Parameter(
                n,
                0.0 if n[1] == n[2] else -4.0,
                4.0,
                "µm²/ms",
                start=1.0 if n[1] == n[2] else 0.0,
                description=f"diffusion tensor entry {n[1:]}",
            )
            for n in D_NAMES
        ),
        *(
            Parameter(n, -20.0, 20.0, "µm⁴/ms²", start=0.0, description=f"MD²·W{n[1:]} (kurtosis)")
            for n in A_NAMES
        ),
    )
    map_names = {"S0": "S0map", **{k: k for k in ("FA", "MD", "AD", "RD", "MK", "AK", "RK")}}
    # the tensor maps are DTI's (same units); the kurtosis maps are dimensionless
    derived_units = {**DTI.derived_units, "MK": "", "AK": "", "RK": ""}

    def __init__(self, bvals: Any, bvecs: Any, *, b0_threshold: float = B0_THRESHOLD):
        b, g = check_gradients(bvals, bvecs, b0_threshold=b0_threshold, source="DKI")
        dw = b > b0_threshold
        shells = np.unique(np.round(b[dw], 3))
        x = dki_design_matrix(torch.from_numpy(b), torch.from_numpy(g)).numpy()
        if shells.size < 2 or np.linalg.matrix_rank(x) < x.shape[1]:
            raise ShapeError(
                "DKI needs at least two non-zero b-values (e.g. 1 and 2 ms/µm²), 15 or more "
                f"non-collinear directions and a b = 0 volume; got b-values {shells.tolist()} "
                f"(ms/µm²) with {int(dw.sum())} diffusion-weighted volumes, a rank-"
                f"{np.linalg.matrix_rank(x)} design (22 needed)"
            )
        super().__init__(b=b, g=g, xmat=x[:, :21])

    @classmethod
    def from_dwi(cls, dwi: Any, *, frame: str = "fsl") -> DKI:
        """A DKI model for a :class:`~qmrkit.io.dwi.DWI`; ``frame`` ∈ {fsl, voxel, world}."""
        frames = {"fsl": lambda: dwi.bvecs, "voxel": dwi.bvecs_voxel, "world": dwi.bvecs_world}
        if frame not in frames:
            raise ParameterError(f"frame must be one of {sorted(frames)}, got {frame!r}")
        return cls(dwi.bvals, frames[frame](), b0_threshold=dwi.b0_threshold)

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        coef = torch.cat([p[n] for n in (*D_NAMES, *A_NAMES)], dim=1)  # (V, 21)
        return p["S0"] * torch.exp(coef @ self.xmat.T)

    def initial_guess(self, data, inputs):
        beta = dki_wls(self.b, self.g, data.real if data.is_complex() else data)
        out = {n: beta[:, i].to(data.dtype) for i, n in enumerate((*D_NAMES, *A_NAMES))}
        out["S0"] = torch.exp(beta[:, 21]).to(data.dtype)
        # inside the box (a noisy voxel's linear fit may leave it)
        for q in self.parameters[1:]:
            out[q.name] = out[q.name].clamp(q.lower, q.upper)
        return out

    def derived(self, p):
        d6 = torch.stack([p[n].reshape(-1) for n in D_NAMES], -1)
        a15 = torch.stack([p[n].reshape(-1) for n in A_NAMES], -1)
        evals, evecs = tensor_eig(_tensor_from_six(d6))
        out = tensor_maps(evals)
        out.update({f"L{i + 1}": evals[:, i] for i in range(3)})
        out.update({f"V1{c}": evecs[:, i, 0] for i, c in enumerate("xyz")})
        out.update(kurtosis_maps(d6, a15))
        return out
