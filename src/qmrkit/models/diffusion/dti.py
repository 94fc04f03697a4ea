"""Diffusion tensor imaging: S(b, g) = S0·exp(−b·gᵀDg), D positive semi-definite by construction.

Units: b in ms/µm², diffusivities in µm²/ms (FA dimensionless). The tensor is expressed in the
frame of the b-vectors it was fitted with (FSL's frame for ``DWI.bvecs``, the world frame for
``DWI.bvecs_world()``); FA, MD, AD and RD do not depend on that choice, the eigenvector does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ...errors import ParameterError, ShapeError
from ...fit.model import Model, Parameter
from ...io.dwi import B0_THRESHOLD, check_gradients

#: smallest signal used in the log-linear fit (as DIPY's MIN_POSITIVE_SIGNAL, relative here)
MIN_SIGNAL = 1e-4

#: Cholesky factor entries (row, column) of the lower-triangular L with D = L·Lᵀ
CHOLESKY = (
    ("L11", 0, 0),
    ("L21", 1, 0),
    ("L22", 1, 1),
    ("L31", 2, 0),
    ("L32", 2, 1),
    ("L33", 2, 2),
)


def design_matrix(b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Log-linear DTI design ``(n, 7)``: log S = X·[Dxx, Dyy, Dzz, Dxy, Dxz, Dyz, log S0].

    Parameters
    ----------
    b : (n,) b-values (ms/µm²); g : (n, 3) unit directions.
    """
    gx, gy, gz = g[:, 0], g[:, 1], g[:, 2]
    cols = [gx * gx, gy * gy, gz * gz, 2 * gx * gy, 2 * gx * gz, 2 * gy * gz]
    return torch.stack([-b * c for c in cols] + [torch.ones_like(b)], dim=1)


def _lstsq(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Per-voxel (weighted) linear least squares: β (V, 7) minimising Σ w·(Xβ − y)²."""
    xw = x[None] if w is None else x[None] * w[..., None]
    yw = y if w is None else y * w
    return torch.linalg.lstsq(xw, yw[..., None]).solution[..., 0]


def dti_wls(
    b: torch.Tensor, g: torch.Tensor, data: torch.Tensor, *, weighted: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard linear DTI fit (Chung 2006, as DIPY's ``fit_method="WLS"``).

    An ordinary least-squares fit of log S, then a fit weighted by the OLS-predicted signal
    (squared, on squared residuals), which undoes the log's noise amplification.

    Parameters
    ----------
    b : (n,) ms/µm²; g : (n, 3) unit directions; data : (V, n) signal (any positive scale).
    weighted : bool
        False gives the OLS fit.

    Returns
    -------
    tensor : (V, 3, 3) µm²/ms (symmetric, not necessarily positive definite)
    s0 : (V,) in data units
    """
    x = design_matrix(b.to(torch.float64), g.to(torch.float64))
    d = data.to(torch.float64)
    floor = MIN_SIGNAL * d.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    y = torch.log(torch.maximum(d, floor))
    beta = _lstsq(x, y, None)
    if weighted:
        beta = _lstsq(x, y, torch.exp(beta @ x.T))
    return _tensor_from_six(beta[:, :6]).to(data.dtype), torch.exp(beta[:, 6]).to(data.dtype)


def _tensor_from_six(six: torch.Tensor) -> torch.Tensor:
    """(V, 6) [xx, yy, zz, xy, xz, yz] → symmetric (V, 3, 3)."""
    xx, yy, zz, xy, xz, yz = six.unbind(-1)
    return torch.stack(
        [
            torch.stack([xx, xy, xz], -1),
            torch.stack([xy, yy, yz], -1),
            torch.stack([xz, yz, zz], -1),
        ],
        dim=-2,
    )


def tensor_from_cholesky(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``D = L·Lᵀ`` (..., 3, 3) from the Cholesky entries ``L11 … L33`` (each of shape (...))."""
    ref = p["L11"]
    zero = torch.zeros_like(ref)
    rows = [[zero, zero, zero] for _ in range(3)]
    for name, i, j in CHOLESKY:
        rows[i][j] = p[name]
    lmat = torch.stack([torch.stack(r, -1) for r in rows], -2)
    return lmat @ lmat.transpose(-1, -2)


def cholesky_from_tensor(tensor: torch.Tensor, min_eig: float = 1e-6) -> dict[str, torch.Tensor]:
    """Cholesky entries of ``tensor (V, 3, 3)`` after raising eigenvalues to ``min_eig``
    (a log-linear fit may return a slightly indefinite tensor in noisy voxels)."""
    t = tensor.to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (t + t.transpose(-1, -2)))
    pd = (evecs * evals.clamp_min(min_eig)[..., None, :]) @ evecs.transpose(-1, -2)
    lmat = torch.linalg.cholesky(pd)
    return {name: lmat[:, i, j].to(tensor.dtype) for name, i, j in CHOLESKY}


def tensor_eig(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (..., 3), largest first, and eigenvectors (..., 3, 3) as columns.

    The sign of each eigenvector is arbitrary in principle; here its largest-magnitude component
    is made positive, so maps are reproducible.
    """
    evals, evecs = torch.linalg.eigh(tensor)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    big = evecs.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(evecs, -2, big))
    return evals, evecs * torch.where(sign == 0, 1.0, sign)


def tensor_maps(evals: torch.Tensor) -> dict[str, torch.Tensor]:
    """FA, MD, AD (λ1), RD ((λ2 + λ3)/2) from eigenvalues ``(..., 3)`` sorted largest first."""
    md = evals.mean(-1)
    dev = ((evals - md[..., None]) ** 2).sum(-1)
    norm2 = (evals**2).sum(-1)
    fa = torch.sqrt(1.5 * dev / norm2.clamp_min(torch.finfo(evals.dtype).tiny))
    return {"FA": fa, "MD": md, "AD": evals[..., 0], "RD": 0.5 * (evals[..., 1] + evals[..., 2])}


class DTI(Model):
    """Diffusion tensor: S = S0·exp(−b·gᵀDg), D = L·Lᵀ (Cholesky, so D is never indefinite).

    Parameters
    ----------
    bvals : (n,) b-values in ms/µm² (``DWI.bvals``).
    bvecs : (n, 3) unit directions (``DWI.bvecs`` or ``DWI.bvecs_world()``).

    Derived maps: FA, MD, AD, RD (µm²/ms), the three eigenvalues L1 ≥ L2 ≥ L3 and the principal
    eigenvector V1x, V1y, V1z (in the frame of ``bvecs``). The closed-form start is the weighted
    linear least-squares fit (:func:`dti_wls`), a standard DTI fit on its own.
    """

    name = "dti"
    measurement_axis = "diffusion-weighted volumes (bvals, bvecs)"
    parameters = (
        Parameter("S0", 0.0, 10.0, "a.u.", amplitude=True, description="signal at b = 0"),
        *(
            Parameter(
                n,
                0.0 if i == j else -2.5,
                2.5,
                "sqrt(µm²/ms)",
                start=0.9 if i == j else 0.0,
                description=f"Cholesky factor entry ({i + 1}, {j + 1}) of D",
            )
            for n, i, j in CHOLESKY
        ),
    )
    map_names = {
        "S0": "S0map",
        "FA": "FA",
        "MD": "MD",
        "AD": "AD",
        "RD": "RD",
        "L1": "L1",
        "L2": "L2",
        "L3": "L3",
        "V1x": "V1x",
        "V1y": "V1y",
        "V1z": "V1z",
    }
    derived_units = {
        "FA": "",
        "MD": "µm²/ms",
        "AD": "µm²/ms",
        "RD": "µm²/ms",
        "L1": "µm²/ms",
        "L2": "µm²/ms",
        "L3": "µm²/ms",
        "V1x": "",
        "V1y": "",
        "V1z": "",
    }

    def __init__(self, bvals: Any, bvecs: Any, *, b0_threshold: float = B0_THRESHOLD):
        b, g = check_gradients(bvals, bvecs, b0_threshold=b0_threshold, source="DTI")
        dw = b > b0_threshold
        if (
            int(dw.sum()) < 6
            or np.linalg.matrix_rank(
                design_matrix(torch.from_numpy(b), torch.from_numpy(g)).numpy()
            )
            < 7
        ):
            raise ShapeError(
                f"DTI needs at least 6 non-collinear diffusion-weighted directions (and a b = 0 "
                f"volume); got {int(dw.sum())} diffusion-weighted volumes whose design is rank "
                "deficient"
            )
        super().__init__(b=b, g=g)

    @classmethod
    def from_dwi(cls, dwi: Any, *, frame: str = "fsl") -> DTI:
        """A DTI model for a :class:`~qmrkit.io.dwi.DWI`; ``frame`` ∈ {fsl, voxel, world}."""
        frames = {"fsl": lambda: dwi.bvecs, "voxel": dwi.bvecs_voxel, "world": dwi.bvecs_world}
        if frame not in frames:
            raise ParameterError(f"frame must be one of {sorted(frames)}, got {frame!r}")
        return cls(dwi.bvals, frames[frame](), b0_threshold=dwi.b0_threshold)

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        g = self.g
        # gᵀ L Lᵀ g = |Lᵀ g|², written out so forward-mode autodiff sees only elementwise ops
        u1 = p["L11"] * g[:, 0] + p["L21"] * g[:, 1] + p["L31"] * g[:, 2]
        u2 = p["L22"] * g[:, 1] + p["L32"] * g[:, 2]
        u3 = p["L33"] * g[:, 2]
        return p["S0"] * torch.exp(-self.b * (u1 * u1 + u2 * u2 + u3 * u3))

    def initial_guess(self, data, inputs):
        tensor, s0 = dti_wls(self.b, self.g, data.real if data.is_complex() else data)
        out = cholesky_from_tensor(tensor)
        out["S0"] = s0
        return out

    def derived(self, p):
        tensor = tensor_from_cholesky({k: p[k].reshape(-1) for k, _, _ in CHOLESKY})
        evals, evecs = tensor_eig(tensor)
        out = tensor_maps(evals)
        out.update({f"L{i + 1}": evals[:, i] for i in range(3)})
        out.update({f"V1{c}": evecs[:, i, 0] for i, c in enumerate("xyz")})
        return out
