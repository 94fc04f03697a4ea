"""A simulated multi-shell, multi-Δ diffusion MRI scan of a brain-like phantom, with ground truth.

Tissues and physics
-------------------
The geometry is that of :func:`~qmrkit.sim.brain_phantom` (scalp and skull left out): white
matter, a folded grey-matter ribbon, and CSF around the brain and in two ventricles.

* **Grey and white matter** follow NEXI (Jelescu et al. 2022): sticks (signal fraction ``f``,
  diffusivity ``Dn``) exchanging water with an isotropic extracellular space (``De``) at rate
  ``rn`` (neurite → extracellular), t_ex = (1 − f)/rn. Each voxel's neurites point along a
  **discrete set of orientations** u_k drawn from a Watson distribution around the voxel's mean
  direction (concentration κ), with equal weights w_k = 1/K. For a gradient direction g the
  signal is ``S0·Σ_k w_k·K(b, t, |g·u_k|)`` where K is
  :func:`~qmrkit.models.diffusion.karger_signal` — the same function NEXI's fit uses. Because the ODF is discrete, its dispersion index is known
  exactly: with ``T = Σ_k w_k u_k u_kᵀ``, ``p2² = Σ_jk w_j w_k P₂(u_j·u_k) = (3‖T‖_F² − 1)/2``,
  and (Funk–Hecke) the rotational invariants of the noise-free signal are exactly NEXI's
  ``S_0 = K_0`` and ``S_2 = |K_2|·p2``.
* **CSF** is free water, ``S0·exp(−b·3.0)`` (D = 3 µm²/ms, body temperature). In NEXI's terms
  f = 0 and De = 3; Dn, rn, p2 and t_ex are undefined there (NaN in the truth maps).
* **Directions**: white-matter bundles run around the phantom's centre (in-plane tangents) with
  a through-plane tilt that varies smoothly; grey-matter neurites are radial (cortical columns).
* **Parameters** vary smoothly inside each tissue over the ranges of :data:`DWI_TISSUES`
  (typical values: f ≈ 0.3–0.45, t_ex ≈ 15–40 ms in cortex as reported by Jelescu 2022 in rat
  and Uhl 2024 / Chan 2025a in human; white-matter values are standard-model-like fractions and
  slower exchange, kept inside NEXI's fitting bounds).
* **S0** = 1000·PD·exp(−TE/T2) with the PD and T2 of :data:`~qmrkit.sim.BRAIN_TISSUES` and TE =
  54 ms (the NEXI protocol's TE in paper 004, table S1).
* **Noise**: Rician, σ = (mean S0 of grey and white matter)/SNR, so SNR is "relative to b = 0"
  in brain tissue (GACELLE simulates SNR 50 for NEXI and 30 for AxCaliberSMT).

Frames and units
----------------
b in ms/µm² (whole s/mm² after rounding, so a written ``.bval`` reads back bit for bit), δ and Δ
in ms, diffusivities µm²/ms, rn 1/ms, t_ex ms. Gradient and fibre directions are in the **voxel
frame** (components along the data array's axes i, j, k); :meth:`DwiPhantom.save` converts the
b-vectors to FSL's convention for the affine it writes (see :mod:`qmrkit.io.dwi`).

The default protocol, :data:`NEXI_SHELLS`, is GACELLE's demo 1 / Chan 2025a NEXI protocol
(paper 004, table S1): Δ = 13, 21, 30 ms with b = 2.3, 3.5, 4.8, 6.5 ms/µm² each, plus 11.3 for
Δ ≥ 21 ms and 17.3 for Δ = 30 ms (15 shells). δ = 6 ms is an assumption (the table gives none;
NEXI's narrow-pulse fit does not use it).

Other tissue models (``dwi_phantom(model=...)``)
------------------------------------------------
The same geometry, ODFs, S0 and noise, with the grey/white-matter signal of another model, each
voxel's neurites (axons) along the discrete Watson ODF so that the DWI signal depends on the
gradient direction and only its spherical mean is the model's (Funk–Hecke: the spherical mean of
Σ_k w_k K(g·u_k) is that of K, whatever the ODF):

* ``"axcalibersmt"`` (Fan 2020): ``(1 − fcsf)·[f·Σ_k w_k exp(−b(D_a ξ_k² + D_eff(a/2)(1 − ξ_k²)))
  + (1 − f)·Σ_k w_k exp(−b(D_e,∥ ξ_k² + D_e,⊥(1 − ξ_k²)))] + fcsf·exp(−3b)`` with ξ_k = g·u_k and
  D_eff the Van Gelderen cylinder (:func:`~qmrkit.models.diffusion.gpa_deff`, finite δ/Δ),
  D_a = D_e,∥ = D0 = 1.7 µm²/ms as the model's defaults; CSF is fcsf = 1. Default protocol
  :data:`AXCALIBER_SHELLS`: GACELLE demo 2 (paper 004, table S1), Δ = 13 and 30 ms, δ = 8 ms
  (Fan 2020's δ; an assumption for Connectome 2.0), without the b = 0.05 ms/µm² shell, which
  qmrkit (as DIPY) counts as b = 0 (b ≤ 50 s/mm²).
* ``"sandi"`` (Palombo 2020): ``fs·exp(−b·D_eff,sphere(Rs, 3.0)) + (1 − fs)·[fnr·Σ_k w_k
  exp(−b·Dn·ξ_k²) + (1 − fnr)·exp(−b·De)]``; CSF is free water (fs = fnr = 0, De = 3). Default
  protocol :data:`SANDI_SHELLS`: b = 0.5–10 ms/µm² at Δ = 20 and 40 ms, δ = 8 ms (two diffusion
  times: at one, soma and extra-cellular signals are degenerate).

The truth maps are the model's parameters and derived maps (NaN where undefined), ``kappa``,
``p2``, ``S0`` and ``direction``; the apparent-tensor maps (``MD``, ``FA``, ...) are NEXI's only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ParameterError, ShapeError
from ..io.dwi import S_PER_MM2_TO_MS_PER_UM2
from ..models.diffusion.dti import tensor_eig, tensor_maps
from ..models.diffusion.nexi import karger_signal
from .brain import BRAIN_TISSUES, brain_phantom
from .noise import add_noise

#: GACELLE demo 1 NEXI protocol (paper 004, table S1): (Δ in ms, b-values in ms/µm²)
NEXI_SHELLS: tuple[tuple[float, tuple[float, ...]], ...] = (
    (13.0, (2.3, 3.5, 4.8, 6.5)),
    (21.0, (2.3, 3.5, 4.8, 6.5, 11.3)),
    (30.0, (2.3, 3.5, 4.8, 6.5, 11.3, 17.3)),
)

#: free-water diffusivity of CSF (µm²/ms)
FREE_WATER_D = 3.0

#: echo time (ms) of the S0 contrast (the NEXI protocol's TE in paper 004, table S1)
TE_MS = 54.0

#: tissue -> parameter ranges (lo, hi); each voxel's value varies smoothly over the range.
#: f: neurite fraction; Dn, De: µm²/ms; tex: exchange time (ms), rn = (1 − f)/tex; kappa: Watson
#: concentration of the neurite orientations (p2 ≈ 0.25–0.5 in grey, ≈ 0.6–0.85 in white matter)
DWI_TISSUES: dict[str, dict[str, tuple[float, float]]] = {
    "gray_matter": {
        "f": (0.30, 0.45),
        "Dn": (1.9, 2.5),
        "De": (0.7, 1.0),
        "tex": (15.0, 40.0),
        "kappa": (1.5, 3.5),
    },
    "white_matter": {
        "f": (0.55, 0.68),
        "Dn": (2.0, 2.4),
        "De": (0.8, 1.1),
        "tex": (40.0, 70.0),
        "kappa": (5.0, 12.0),
    },
}

#: GACELLE demo 2 AxCaliberSMT protocol (paper 004, table S1) without b = 0.05 ms/µm² (a b = 0
#: volume for qmrkit and DIPY): (Δ in ms, b-values in ms/µm²); δ = 8 ms (Fan 2020)
AXCALIBER_SHELLS: tuple[tuple[float, tuple[float, ...]], ...] = (
    (13.0, (0.35, 0.8, 1.5, 2.4, 3.45, 4.75, 6.0)),
    (30.0, (0.2, 0.95, 2.3, 4.25, 6.75, 9.85, 13.5, 17.8)),
)

#: a SANDI protocol with two diffusion times (δ = 8 ms, Δ = 20 and 40 ms, b up to 10 ms/µm² as in
#: Palombo 2020's human data)
SANDI_SHELLS: tuple[tuple[float, tuple[float, ...]], ...] = (
    (20.0, (0.5, 1.0, 2.5, 4.0, 5.5, 7.0, 8.5, 10.0)),
    (40.0, (0.5, 1.0, 2.5, 4.0, 5.5, 7.0, 8.5, 10.0)),
)

#: AxCaliberSMT tissue ranges: a (µm, axon diameter; above the ≈ 2 µm resolution limit of these
#: gradients), f = f_r/(f_r + f_h), fcsf, DeR (µm²/ms), kappa (Watson). Typical in-vivo values
#: (Fan 2020 report 4–6 µm in white matter); grey matter gets fewer, thinner-looking "axons" and
#: more free water, as an AxCaliberSMT fit of cortex does.
AXCALIBER_TISSUES: dict[str, dict[str, tuple[float, float]]] = {
    "gray_matter": {
        "a": (3.0, 6.0),
        "f": (0.35, 0.55),
        "fcsf": (0.10, 0.25),
        "DeR": (0.6, 1.0),
        "kappa": (1.5, 3.5),
    },
    "white_matter": {
        "a": (3.5, 8.0),
        "f": (0.55, 0.75),
        "fcsf": (0.03, 0.12),
        "DeR": (0.3, 0.7),
        "kappa": (5.0, 12.0),
    },
}

#: SANDI tissue ranges: fs (soma fraction), fnr = f_n/(f_n + f_e), Dn, De (µm²/ms), Rs (µm),
#: kappa. Grey matter: large soma fraction (Palombo 2020: f_s ≈ 0.3–0.5, R_s ≈ 6–10 µm in cortex);
#: white matter: few somas.
SANDI_TISSUES: dict[str, dict[str, tuple[float, float]]] = {
    "gray_matter": {
        "fs": (0.25, 0.45),
        "fnr": (0.45, 0.65),
        "Dn": (1.8, 2.4),
        "Rs": (6.0, 10.0),
        "De": (0.6, 1.0),
        "kappa": (1.5, 3.5),
    },
    "white_matter": {
        "fs": (0.08, 0.18),
        "fnr": (0.6, 0.8),
        "Dn": (2.0, 2.5),
        "Rs": (4.0, 7.0),
        "De": (0.6, 0.9),
        "kappa": (5.0, 12.0),
    },
}

#: models the phantom simulates -> (default tissue ranges, default shells, default δ in ms)
PHANTOM_MODELS: dict[str, tuple[dict, tuple, float]] = {
    "nexi": (DWI_TISSUES, NEXI_SHELLS, 6.0),
    "axcalibersmt": (AXCALIBER_TISSUES, AXCALIBER_SHELLS, 8.0),
    "sandi": (SANDI_TISSUES, SANDI_SHELLS, 8.0),
}

#: fixed diffusivities (µm²/ms) of the phantom's AxCaliberSMT and SANDI tissue: the models' defaults
AXCALIBER_FIXED = {"Da": 1.7, "DeL": 1.7, "D0": 1.7, "Dcsf": FREE_WATER_D}
SANDI_FIXED = {"Dsoma": 3.0}

#: truth maps of each model (besides kappa, p2, S0, direction)
TRUTH_NAMES = {
    "nexi": ("f", "Dn", "De", "rn", "p2", "tex", "kappa"),
    "axcalibersmt": ("a", "f", "fcsf", "DeR", "fr", "fh", "p2", "kappa"),
    "sandi": ("fs", "fnr", "Dn", "Rs", "De", "fn", "fe", "p2", "kappa"),
}

#: labels of the phantom (as :data:`~qmrkit.sim.BRAIN_TISSUES`; scalp and skull are background)
DWI_LABELS = {3: "csf", 4: "gray_matter", 5: "white_matter"}


# -------------------------------------------------------------------------------------------------
# protocol
# -------------------------------------------------------------------------------------------------
@dataclass
class DwiProtocol:
    """A per-volume gradient table.

    Attributes
    ----------
    bvals : (n,) b-values in ms/µm².
    bvecs : (n, 3) unit directions in the voxel frame (zero rows for b = 0 volumes).
    small_delta, big_delta : (n,) gradient duration δ and separation Δ in ms.
    """

    bvals: np.ndarray
    bvecs: np.ndarray
    small_delta: np.ndarray
    big_delta: np.ndarray

    @property
    def n_volumes(self) -> int:
        return int(self.bvals.size)


def _unit_rows(g: np.ndarray) -> np.ndarray:
    """Rows divided by their norms until dividing again changes no bit (so that a reader which
    normalises, such as :func:`qmrkit.io.dwi.check_gradients`, gives back the same numbers)."""
    g = np.asarray(g, dtype=np.float64)
    for _ in range(8):
        nxt = g / np.linalg.norm(g, axis=1, keepdims=True)
        if np.array_equal(nxt, g):
            break
        g = nxt
    return g


def hemisphere_directions(n: int) -> np.ndarray:
    """``n`` well-spread unit directions on the upper hemisphere (spiral / Fibonacci lattice,
    equal area per point), ``(n, 3)``. DWI signals are antipodally symmetric, so a hemisphere
    covers the sphere."""
    if n < 1:
        raise ParameterError(f"n must be >= 1, got {n}")
    i = np.arange(n) + 0.5
    z = 1.0 - i / n
    r = np.sqrt(1.0 - z * z)
    phi = i * np.pi * (3.0 - np.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def dwi_protocol(
    shells: Sequence[tuple[float, Sequence[float]]] = NEXI_SHELLS,
    *,
    n_dirs: int = 32,
    n_b0: int = 2,
    small_delta: float = 6.0,
    seed: int | None = 0,
) -> DwiProtocol:
    """A multi-shell, multi-Δ protocol: for each Δ, ``n_b0`` b = 0 volumes then each b-value on
    ``n_dirs`` directions (each shell's direction set randomly rotated, so shells differ).

    Parameters
    ----------
    shells : sequence of (Δ, b-values)
        Gradient separation Δ (ms) and the b-values (ms/µm²) acquired at it; default
        :data:`NEXI_SHELLS` (GACELLE's NEXI protocol). b-values are rounded to whole s/mm².
    n_dirs : int
        Directions per shell (≥ 6: an l = 2 spherical-harmonic fit needs 6; 32 or 64 in paper 004).
    n_b0 : int
        b = 0 volumes per Δ (≥ 1 in all).
    small_delta : float
        Gradient duration δ (ms), the same for every volume, 0 < δ ≤ Δ.
    seed : int
        Seed of the per-shell rotations.

    Returns
    -------
    DwiProtocol
    """
    if not shells:
        raise ParameterError("shells must list at least one (Δ, b-values) pair")
    if n_dirs < 6:
        raise ParameterError(f"n_dirs must be >= 6 (an l = 2 SH fit needs 6), got {n_dirs}")
    if n_b0 < 0 or n_b0 * len(shells) < 1:
        raise ParameterError(f"n_b0 must give at least one b = 0 volume, got {n_b0}")
    rng = np.random.default_rng(seed)
    base = hemisphere_directions(n_dirs)
    b, g, bd = [], [], []
    for delta, bvals in shells:
        delta = float(delta)
        if not np.isfinite(delta) or delta <= 0 or not small_delta <= delta:
            raise ParameterError(
                f"each Δ must be a positive number of ms >= δ = {small_delta}, got {delta}"
            )
        bvals = np.atleast_1d(np.asarray(bvals, dtype=np.float64))
        if bvals.size == 0 or not np.isfinite(bvals).all() or (bvals <= 0).any():
            raise ParameterError(f"b-values at Δ = {delta:g} ms must be positive, got {bvals}")
        b += [0.0] * n_b0
        g += [np.zeros((n_b0, 3))]
        bd += [delta] * n_b0
        for bv in bvals:
            b += [bv] * n_dirs
            g += [base @ _random_rotation(rng).T]
            bd += [delta] * n_dirs
    if not small_delta > 0:
        raise ParameterError(f"small_delta must be > 0 ms, got {small_delta}")
    # whole s/mm², computed exactly as read_bval does, so written files read back bit for bit
    bv = np.round(np.asarray(b) / S_PER_MM2_TO_MS_PER_UM2) * S_PER_MM2_TO_MS_PER_UM2
    gv = np.concatenate(g)
    dw = bv > 0
    gv[dw] = _unit_rows(gv[dw])
    return DwiProtocol(bv, gv, np.full(bv.size, float(small_delta)), np.asarray(bd, dtype=float))


# -------------------------------------------------------------------------------------------------
# orientation distributions
# -------------------------------------------------------------------------------------------------
def _perpendicular_basis(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors (N, 3) completing each unit ``mu (N, 3)`` to a right-handed basis."""
    helper = np.where(np.abs(mu[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    e1 = helper - (helper * mu).sum(1, keepdims=True) * mu
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    return e1, np.cross(mu, e1)


def watson_orientations(
    mu: Any, kappa: Any, n: int, rng: np.random.Generator | int | None = 0
) -> np.ndarray:
    """Draw ``n`` orientations per voxel from a Watson distribution ∝ exp(κ·(u·μ)²).

    ``|cos θ|`` has density ∝ exp(κt²) on [0, 1], whose CDF erfi(√κ·t)/erfi(√κ) is inverted by
    bisection; the azimuth is uniform and the sign of cos θ random (the distribution is antipodally
    symmetric).

    Parameters
    ----------
    mu : (N, 3) mean directions (normalised here).
    kappa : (N,) concentrations κ ≥ 0 (0: uniform on the sphere).
    n : int
        Orientations per voxel.
    rng : Generator or seed

    Returns
    -------
    ndarray (N, n, 3), unit vectors.
    """
    from scipy.special import erfi

    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    mu = np.asarray(mu, dtype=np.float64).reshape(-1, 3)
    mu = mu / np.linalg.norm(mu, axis=1, keepdims=True)
    k = np.broadcast_to(np.asarray(kappa, dtype=np.float64).reshape(-1), (mu.shape[0],))
    if not np.isfinite(k).all() or (k < 0).any() or (k > 700).any():
        raise ParameterError(f"kappa must be in [0, 700], got range [{k.min()}, {k.max()}]")
    u = rng.uniform(size=(mu.shape[0], n))
    sk = np.sqrt(k)[:, None]
    tiny = sk[:, 0] < 1e-6
    lo, hi = np.zeros_like(u), np.ones_like(u)
    target = u * erfi(np.where(tiny[:, None], 1.0, sk))
    for _ in range(60):  # bisection to 2^-60: exact in float64
        mid = 0.5 * (lo + hi)
        below = erfi(np.where(tiny[:, None], 1.0, sk) * mid) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    t = np.where(tiny[:, None], u, 0.5 * (lo + hi))
    t = t * rng.choice([-1.0, 1.0], size=t.shape)
    phi = rng.uniform(0.0, 2 * np.pi, size=t.shape)
    e1, e2 = _perpendicular_basis(mu)
    s = np.sqrt(np.clip(1.0 - t * t, 0.0, None))
    out = (
        t[..., None] * mu[:, None]
        + (s * np.cos(phi))[..., None] * e1[:, None]
        + (s * np.sin(phi))[..., None] * e2[:, None]
    )
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def watson_p2(kappa: Any) -> np.ndarray:
    """⟨P₂(u·μ)⟩ of the continuous Watson distribution: with ⟨t²⟩ = 1/(2√κ·F(√κ)) − 1/(2κ)
    (F: Dawson's integral), p2 = (3⟨t²⟩ − 1)/2 (κ = 0 gives 0). A reference for the sampler."""
    from scipy.special import dawsn

    k = np.asarray(kappa, dtype=np.float64)
    pos = k > 1e-8
    ks = np.where(pos, k, 1.0)
    sk = np.sqrt(ks)
    t2 = np.where(pos, 1.0 / (2 * sk * dawsn(sk)) - 1.0 / (2 * ks), 1.0 / 3.0)
    return 1.5 * t2 - 0.5


def odf_p2(orientations: Any, weights: Any = None) -> np.ndarray:
    """Exact dispersion index p₂ of discrete ODFs: ``sqrt((3‖T‖_F² − 1)/2)`` with
    ``T = Σ_k w_k u_k u_kᵀ`` (= sqrt(Σ_jk w_j w_k P₂(u_j·u_k)), the l = 2 rotational invariant of
    the ODF normalised so that a single orientation gives 1).

    Parameters
    ----------
    orientations : (..., K, 3) unit vectors.
    weights : (..., K) or (K,), summing to 1; default equal weights.
    """
    u = np.asarray(orientations, dtype=np.float64)
    w = np.full(u.shape[-2], 1.0 / u.shape[-2]) if weights is None else np.asarray(weights, float)
    t = np.einsum("...k,...ki,...kj->...ij", np.broadcast_to(w, u.shape[:-1]), u, u)
    return np.sqrt(np.clip(1.5 * (t * t).sum((-1, -2)) - 0.5, 0.0, None))


def dispersed_nexi_signal(
    orientations: Any,
    params: Mapping[str, Any],
    bvals: Any,
    bvecs: Any,
    diffusion_time: Any,
    *,
    weights: Any = None,
    chunk: int = 64,
) -> np.ndarray:
    """NEXI signal of voxels with discrete neurite ODFs, ``Σ_k w_k·K(b, t, |g·u_k|)`` (S/S0).

    Parameters
    ----------
    orientations : (N, K, 3) unit neurite orientations per voxel.
    params : dict with ``f``, ``Dn`` (µm²/ms), ``De`` (µm²/ms), ``rn`` (1/ms), each (N,).
    bvals : (M,) ms/µm²; bvecs : (M, 3) unit directions (same frame as ``orientations``).
    diffusion_time : (M,) or float, ms (Δ for narrow pulses, Δ − δ/3 for wide ones).
    weights : (N, K) or (K,), optional; default equal weights 1/K.
    chunk : int
        Voxels per batch (bounds memory to ≈ chunk·K·M·8·10 bytes).

    Returns
    -------
    ndarray (N, M), float64.
    """
    u = torch.as_tensor(np.asarray(orientations, dtype=np.float64))
    if u.ndim != 3 or u.shape[-1] != 3:
        raise ShapeError(f"orientations must be (N, K, 3), got {tuple(u.shape)}")
    n_vox, n_k = u.shape[:2]
    b = torch.as_tensor(np.asarray(bvals, dtype=np.float64).reshape(-1))
    g = torch.as_tensor(np.asarray(bvecs, dtype=np.float64)).reshape(-1, 3)
    t = torch.as_tensor(np.broadcast_to(np.asarray(diffusion_time, float), b.shape).copy())
    if g.shape[0] != b.shape[0]:
        raise ShapeError(f"{b.shape[0]} b-values but {g.shape[0]} b-vectors")
    w = torch.full((n_k,), 1.0 / n_k, dtype=torch.float64) if weights is None else None
    wt = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
    p = {
        k: torch.as_tensor(np.asarray(params[k], dtype=np.float64).reshape(-1))
        for k in ("f", "Dn", "De", "rn")
    }
    out = torch.empty((n_vox, b.shape[0]), dtype=torch.float64)
    for s in range(0, n_vox, chunk):
        sl = slice(s, min(s + chunk, n_vox))
        xi = (u[sl] @ g.T).abs()  # (n, K, M)
        col = {k: v[sl][:, None, None] for k, v in p.items()}
        sig = karger_signal(b, t, xi, col["f"], col["Dn"], col["De"], col["rn"])
        ww = w if wt is None else (wt[sl] if wt.ndim == 2 else wt)
        out[sl] = (sig * ww[..., None]).sum(1)
    return out.numpy()


def _odf_inputs(orientations: Any, bvals: Any, bvecs: Any, weights: Any):
    """Common checks and float64 tensors of the dispersed-signal functions."""
    u = torch.as_tensor(np.asarray(orientations, dtype=np.float64))
    if u.ndim != 3 or u.shape[-1] != 3:
        raise ShapeError(f"orientations must be (N, K, 3), got {tuple(u.shape)}")
    b = torch.as_tensor(np.asarray(bvals, dtype=np.float64).reshape(-1))
    g = torch.as_tensor(np.asarray(bvecs, dtype=np.float64)).reshape(-1, 3)
    if g.shape[0] != b.shape[0]:
        raise ShapeError(f"{b.shape[0]} b-values but {g.shape[0]} b-vectors")
    n_k = u.shape[1]
    if weights is None:
        w = torch.full((1, n_k), 1.0 / n_k, dtype=torch.float64)
    else:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).reshape(-1, n_k)
    return u, b, g, w


def _timing_per_volume(value: Any, n: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64).reshape(-1), (n,)).copy()
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise ParameterError(f"{name} must be positive ms for every volume, got {value}")
    return arr


def _gpa_per_volume(geometry: str, radius: np.ndarray, d0: float, sd, bd) -> torch.Tensor:
    """D_eff (N, M) for radii (N,) µm at every volume's (δ, Δ), evaluated once per distinct
    timing (float64)."""
    from ..models.diffusion.restricted import gpa_deff

    timing = np.stack([sd, bd], 1)
    uniq, inv = np.unique(timing, axis=0, return_inverse=True)
    r = torch.as_tensor(np.asarray(radius, dtype=np.float64).reshape(-1, 1))
    deff = gpa_deff(geometry, r, d0, uniq[:, 0], uniq[:, 1])  # (N, n_timing)
    return deff[:, torch.as_tensor(inv.reshape(-1))]


def dispersed_axcaliber_signal(
    orientations: Any,
    params: Mapping[str, Any],
    bvals: Any,
    bvecs: Any,
    small_delta: Any,
    big_delta: Any,
    *,
    weights: Any = None,
    Da: float = AXCALIBER_FIXED["Da"],
    DeL: float = AXCALIBER_FIXED["DeL"],
    D0: float = AXCALIBER_FIXED["D0"],
    Dcsf: float = AXCALIBER_FIXED["Dcsf"],
    chunk: int = 64,
) -> np.ndarray:
    """AxCaliberSMT tissue with discrete axon ODFs, per gradient direction (S/S0):
    ``(1 − fcsf)·Σ_k w_k [f·exp(−b(D_a ξ² + D_eff(1 − ξ²))) + (1 − f)·exp(−b(D_e,∥ ξ² +
    D_e,⊥(1 − ξ²)))] + fcsf·exp(−b·D_csf)``, ξ = g·u_k, D_eff the Van Gelderen cylinder of
    radius a/2 at the volume's (δ, Δ).

    Parameters
    ----------
    orientations : (N, K, 3) unit axon orientations per voxel.
    params : dict with ``a`` (µm), ``f``, ``fcsf``, ``DeR`` (µm²/ms), each (N,).
    bvals : (M,) ms/µm²; bvecs : (M, 3) unit directions (frame of ``orientations``).
    small_delta, big_delta : (M,) or float, δ and Δ in ms.
    weights : (N, K) or (K,), optional (equal weights by default).
    Da, DeL, D0, Dcsf : float
        Fixed diffusivities, µm²/ms (:class:`~qmrkit.models.diffusion.AxCaliberSMT`'s defaults).
    chunk : int
        Voxels per batch.

    Returns
    -------
    ndarray (N, M), float64.
    """
    u, b, g, w = _odf_inputs(orientations, bvals, bvecs, weights)
    m = b.shape[0]
    sd = _timing_per_volume(small_delta, m, "small_delta")
    bd = _timing_per_volume(big_delta, m, "big_delta")
    p = {k: np.asarray(params[k], dtype=np.float64).reshape(-1) for k in ("a", "f", "fcsf", "DeR")}
    deff = _gpa_per_volume("cylinder", 0.5 * p["a"], D0, sd, bd)  # (N, M)
    t = {k: torch.as_tensor(v) for k, v in p.items()}
    out = torch.empty((u.shape[0], m), dtype=torch.float64)
    for s in range(0, u.shape[0], chunk):
        sl = slice(s, min(s + chunk, u.shape[0]))
        xi2 = (u[sl] @ g.T) ** 2  # (n, K, M)
        ww = (w[sl] if w.shape[0] > 1 else w)[..., None]
        r = torch.exp(-b * (Da * xi2 + deff[sl][:, None] * (1 - xi2)))
        h = torch.exp(-b * (DeL * xi2 + t["DeR"][sl][:, None, None] * (1 - xi2)))
        f = t["f"][sl][:, None]
        tissue = f * (ww * r).sum(1) + (1 - f) * (ww * h).sum(1)
        fc = t["fcsf"][sl][:, None]
        out[sl] = (1 - fc) * tissue + fc * torch.exp(-b * Dcsf)
    return out.numpy()


def dispersed_sandi_signal(
    orientations: Any,
    params: Mapping[str, Any],
    bvals: Any,
    bvecs: Any,
    small_delta: Any,
    big_delta: Any,
    *,
    weights: Any = None,
    Dsoma: float = SANDI_FIXED["Dsoma"],
    chunk: int = 64,
) -> np.ndarray:
    """SANDI tissue with discrete neurite ODFs, per gradient direction (S/S0):
    ``fs·exp(−b·D_eff,sphere(Rs)) + (1 − fs)·[fnr·Σ_k w_k exp(−b·Dn·(g·u_k)²) +
    (1 − fnr)·exp(−b·De)]`` (Murday–Cotts sphere at the volume's (δ, Δ)).

    Parameters
    ----------
    orientations : (N, K, 3) unit neurite orientations per voxel.
    params : dict with ``fs``, ``fnr``, ``Dn`` (µm²/ms), ``Rs`` (µm), ``De`` (µm²/ms), each (N,).
    bvals, bvecs, small_delta, big_delta, weights, chunk :
        As :func:`dispersed_axcaliber_signal`.
    Dsoma : float
        Intrinsic soma diffusivity, µm²/ms (3.0, as :class:`~qmrkit.models.diffusion.SANDI`).

    Returns
    -------
    ndarray (N, M), float64.
    """
    u, b, g, w = _odf_inputs(orientations, bvals, bvecs, weights)
    m = b.shape[0]
    sd = _timing_per_volume(small_delta, m, "small_delta")
    bd = _timing_per_volume(big_delta, m, "big_delta")
    keys = ("fs", "fnr", "Dn", "Rs", "De")
    p = {k: np.asarray(params[k], dtype=np.float64).reshape(-1) for k in keys}
    soma = torch.exp(-b * _gpa_per_volume("sphere", p["Rs"], Dsoma, sd, bd))  # (N, M)
    t = {k: torch.as_tensor(v)[:, None] for k, v in p.items()}
    out = torch.empty((u.shape[0], m), dtype=torch.float64)
    for s in range(0, u.shape[0], chunk):
        sl = slice(s, min(s + chunk, u.shape[0]))
        xi2 = (u[sl] @ g.T) ** 2
        ww = (w[sl] if w.shape[0] > 1 else w)[..., None]
        stick = (ww * torch.exp(-b * t["Dn"][sl][..., None] * xi2)).sum(1)
        ball = torch.exp(-b * t["De"][sl])
        fs, fnr = t["fs"][sl], t["fnr"][sl]
        out[sl] = fs * soma[sl] + (1 - fs) * (fnr * stick + (1 - fnr) * ball)
    return out.numpy()


# -------------------------------------------------------------------------------------------------
# phantom
# -------------------------------------------------------------------------------------------------
@dataclass
class DwiPhantom:
    """A simulated DWI series with its protocol and ground truth (module docs).

    Attributes
    ----------
    data : ndarray float32 (*spatial, n)
        Series in NIfTI order (x, y[, z]), volumes last.
    bvals, bvecs, small_delta, big_delta : the protocol (:class:`DwiProtocol`), bvecs in the voxel
        frame.
    mask : bool (*spatial): brain (CSF, grey and white matter).
    labels : int (*spatial): :data:`DWI_LABELS` (0 background).
    tissues : dict label -> name.
    truth : dict name -> ndarray
        ``f`` (0 in CSF), ``Dn``, ``De`` (3 in CSF), ``rn``, ``p2``, ``tex``, ``kappa`` (NaN where
        undefined), ``S0``; the b → 0 apparent diffusion tensor's ``MD``, ``AD``, ``RD`` (µm²/ms),
        ``FA`` and ``V1`` (*spatial, 3) — exact for Kärger exchange (the first cumulant does not
        depend on exchange): D = f·Dn·Σ_k w_k u_k u_kᵀ + (1 − f)·De·I — and ``direction``
        (*spatial, 3), the mean neurite direction. Directions are in the voxel frame.
    orientations : ndarray (*spatial, K, 3)
        The discrete neurite ODF of every voxel (zeros outside grey and white matter).
    sigma : float
        Noise σ (0: noise-free); snr: the SNR it came from.
    affine : (4, 4)
        The affine :meth:`save` writes by default (2 mm isotropic, centred).
    model : str
        Tissue model of grey and white matter (``"nexi"``, ``"axcalibersmt"``, ``"sandi"``); the
        truth maps are its parameters (module docs).
    """

    data: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    small_delta: np.ndarray
    big_delta: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    tissues: dict[int, str]
    truth: dict[str, np.ndarray]
    orientations: np.ndarray = field(repr=False)
    sigma: float = 0.0
    snr: float | None = None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    model: str = "nexi"

    @property
    def protocol(self) -> DwiProtocol:
        return DwiProtocol(self.bvals, self.bvecs, self.small_delta, self.big_delta)

    def tissue_mask(self, name: str) -> np.ndarray:
        """Boolean (*spatial) map of one tissue: ``"csf"``, ``"gray_matter"`` or
        ``"white_matter"``."""
        labs = [k for k, v in self.tissues.items() if v == name]
        if not labs:
            known = sorted(self.tissues.values())
            raise ParameterError(f"unknown tissue {name!r}; tissues: {known}")
        return self.labels == labs[0]

    def save(
        self,
        directory: str | Path,
        *,
        affine: Any = None,
        stem: str = "dwi",
        protocol: str = "tsv",
    ) -> dict[str, Path]:
        """Write the series as users have it (:func:`qmrkit.io.save_dwi`): ``<stem>.nii.gz``,
        ``.bval`` (s/mm²), ``.bvec`` (FSL's frame for ``affine``), ``<stem>_protocol.tsv|yaml``
        (b, δ, Δ) and ``mask.nii.gz``; 2D phantoms get a singleton z axis. Returns the paths by
        role (``dwi``, ``bval``, ``bvec``, ``protocol``, ``mask``)."""
        from ..io.dwi import save_dwi
        from ..io.nifti import save_nifti

        aff = self.affine if affine is None else np.asarray(affine, dtype=np.float64)
        out = save_dwi(
            directory,
            self.data,
            self.bvals,
            self.bvecs,
            affine=aff,
            small_delta=self.small_delta,
            big_delta=self.big_delta,
            frame="voxel",
            stem=stem,
            protocol=protocol,
        )
        mask = self.mask if self.mask.ndim == 3 else self.mask[:, :, None]
        out["mask"] = save_nifti(Path(directory) / "mask.nii.gz", mask.astype(np.uint8), affine=aff)
        return out


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    axes = [(np.arange(n) - n // 2) / (n / 2) for n in shape]
    return list(np.meshgrid(*axes, indexing="ij"))


def _smooth_unit_field(coords: list[np.ndarray], sel: np.ndarray, rng: np.random.Generator):
    """A smooth random field over the voxels ``sel``, scaled to [0, 1] there (a few long-wave
    cosines: parameters change over the phantom as they do over a brain, not voxel to voxel)."""
    val = np.zeros(int(sel.sum()))
    for _ in range(4):
        k = rng.uniform(-1.2, 1.2, size=len(coords))
        ph = rng.uniform(0, 2 * np.pi)
        val += np.cos(np.pi * sum(ki * c[sel] for ki, c in zip(k, coords, strict=True)) + ph)
    span = val.max() - val.min()
    return (val - val.min()) / span if span > 0 else np.full_like(val, 0.5)


def default_affine(shape: Sequence[int], voxel_mm: float = 2.0) -> np.ndarray:
    """A RAS affine with ``voxel_mm`` isotropic voxels, the volume centred on the origin."""
    shp = list(shape) + [1] * (3 - len(shape))
    aff = np.diag([voxel_mm] * 3 + [1.0])
    aff[:3, 3] = -voxel_mm * (np.asarray(shp) // 2)
    return aff


def _derive(model: str, vals: dict[str, np.ndarray]) -> None:
    """Add the derived truth of one tissue's drawn parameters (in place)."""
    if model == "nexi":
        vals["rn"] = (1.0 - vals["f"]) / vals["tex"]
    elif model == "axcalibersmt":
        vals["fr"] = vals["f"] * (1.0 - vals["fcsf"])
        vals["fh"] = (1.0 - vals["f"]) * (1.0 - vals["fcsf"])
    else:
        vals["fn"] = vals["fnr"] * (1.0 - vals["fs"])
        vals["fe"] = (1.0 - vals["fnr"]) * (1.0 - vals["fs"])


def _check_ranges(model: str, ranges: Mapping[str, Mapping[str, tuple[float, float]]]) -> None:
    need = set(PHANTOM_MODELS[model][0]["gray_matter"])
    for name in ("gray_matter", "white_matter"):
        if name not in ranges or set(ranges[name]) != need:
            raise ParameterError(
                f"tissues must give {sorted(need)} ranges for gray_matter and white_matter "
                f"(model {model!r})"
            )
        for key, (lo, hi) in ranges[name].items():
            frac = key in ("f", "fcsf", "fs", "fnr")
            if not (np.isfinite([lo, hi]).all() and 0 <= lo <= hi and (not frac or hi <= 1)):
                raise ParameterError(
                    f"tissues[{name!r}][{key!r}] must be (lo, hi) with 0 <= lo <= hi"
                    + (" <= 1" if frac else "")
                    + f", got {(lo, hi)}"
                )


def dwi_phantom(
    shape: Sequence[int] = (48, 48),
    *,
    model: str = "nexi",
    protocol: DwiProtocol | None = None,
    snr: float | None = 50.0,
    n_orientations: int = 32,
    wide_pulse: bool = False,
    s0: float = 1000.0,
    tissues: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    seed: int | None = 0,
) -> DwiPhantom:
    """Simulate a brain-like DWI scan with known tissue parameters (module docs).

    Parameters
    ----------
    shape : (nx, ny) or (nx, ny, nz)
        Image size in NIfTI order (2D or 3D).
    model : {"nexi", "axcalibersmt", "sandi"}
        Tissue model of grey and white matter (its signal per gradient direction, module docs).
    protocol : DwiProtocol, optional
        Gradient table; default :func:`dwi_protocol` on the model's shells (NEXI: GACELLE's NEXI
        protocol, 32 directions per shell, 2 b = 0 volumes per Δ: 486 volumes; AxCaliberSMT:
        :data:`AXCALIBER_SHELLS`, δ = 8 ms; SANDI: :data:`SANDI_SHELLS`, δ = 8 ms).
    snr : float or None
        S0/σ relative to the mean b = 0 signal of grey and white matter (Rician noise); None:
        noise-free.
    n_orientations : int
        Orientations K of each voxel's discrete ODF.
    wide_pulse : bool
        NEXI only: diffusion time Δ − δ/3 instead of Δ (as ``NEXI(wide_pulse=True)``).
    s0 : float
        Signal scale: S0 = s0·PD·exp(−TE/T2).
    tissues : dict, optional
        Parameter ranges per tissue, as :data:`DWI_TISSUES` / :data:`AXCALIBER_TISSUES` /
        :data:`SANDI_TISSUES` (the model's default).
    seed : int
        One seed for the parameter fields, the orientations and the noise.

    Returns
    -------
    DwiPhantom
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or any(s < 4 for s in shape):
        raise ShapeError(
            f"shape must have 2 or 3 entries >= 4 (NIfTI order x, y[, z]), got {shape}"
        )
    if model not in PHANTOM_MODELS:
        raise ParameterError(f"model must be one of {', '.join(PHANTOM_MODELS)}, got {model!r}")
    if snr is not None and not snr > 0:
        raise ParameterError(f"snr must be > 0 (or None for noise-free data), got {snr}")
    if n_orientations < 1:
        raise ParameterError(f"n_orientations must be >= 1, got {n_orientations}")
    if wide_pulse and model != "nexi":
        raise ParameterError(
            f"wide_pulse applies to model='nexi' only ({model} uses δ and Δ themselves)"
        )
    default_ranges, default_shells, default_sd = PHANTOM_MODELS[model]
    ranges = dict(default_ranges if tissues is None else tissues)
    _check_ranges(model, ranges)
    if protocol is None:
        prot = dwi_protocol(default_shells, small_delta=default_sd, seed=seed)
    else:
        prot = protocol
    seeds = np.random.SeedSequence(seed).spawn(3)
    rng_fields, rng_odf = np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1])
    noise_seed = int(seeds[2].generate_state(1)[0])

    # brain_phantom works in array order (.., y, x); NIfTI order reverses the axes
    labels = np.ascontiguousarray(brain_phantom(shape[::-1])["labels"].T)
    labels[(labels == 1) | (labels == 2)] = 0  # scalp and skull: not part of a DWI phantom
    coords = _grid(shape)
    x, y = coords[0], coords[1]
    z = coords[2] if len(shape) == 3 else np.zeros_like(x)
    n_sp = len(shape)

    nan = np.full(shape, np.nan)
    truth = {k: nan.copy() for k in TRUTH_NAMES[model]}
    direction = np.zeros((*shape, 3))
    # white matter: tangents around the centre, tilted through-plane by a smooth angle
    r = np.sqrt(x * x + y * y)
    tang = np.stack([-y, x, np.zeros_like(x)], -1) / np.maximum(r, 1e-9)[..., None]
    tang[r < 1e-9] = (1.0, 0.0, 0.0)
    tilt = 0.7 * np.sin(1.5 * np.pi * x) * np.cos(np.pi * y) + 0.5 * z
    wm_dir = np.cos(tilt)[..., None] * tang + np.sin(tilt)[..., None] * np.array([0.0, 0.0, 1.0])
    # grey matter: radial (cortical columns)
    rad = np.stack([x, y, z if n_sp == 3 else np.zeros_like(x)], -1)
    rn_ = np.linalg.norm(rad, axis=-1, keepdims=True)
    gm_dir = np.where(rn_ > 1e-9, rad / np.maximum(rn_, 1e-9), [1.0, 0.0, 0.0])

    orientations = np.zeros((*shape, n_orientations, 3))
    for lab, name, mean_dir in ((4, "gray_matter", gm_dir), (5, "white_matter", wm_dir)):
        sel = labels == lab
        if not sel.any():
            continue
        vals = {}
        for key, (lo, hi) in ranges[name].items():
            vals[key] = lo + (hi - lo) * _smooth_unit_field(coords, sel, rng_fields)
        _derive(model, vals)
        u = watson_orientations(mean_dir[sel], vals["kappa"], n_orientations, rng_odf)
        orientations[sel] = u
        vals["p2"] = odf_p2(u)
        for key in truth:
            truth[key][sel] = vals[key]
        direction[sel] = mean_dir[sel]
    csf = labels == 3
    # CSF is free water, D = 3 µm²/ms, in each model's terms
    csf_truth = {
        "nexi": {"f": 0.0, "De": FREE_WATER_D},
        "axcalibersmt": {"fcsf": 1.0, "fr": 0.0, "fh": 0.0},
        "sandi": {"fs": 0.0, "fnr": 0.0, "fn": 0.0, "fe": 1.0, "De": FREE_WATER_D},
    }[model]
    for key, v in csf_truth.items():
        truth[key][csf] = v

    # S0 = s0·PD·exp(−TE/T2)
    s0_map = np.zeros(shape)
    for lab in DWI_LABELS:
        _, pd, _, t2 = BRAIN_TISSUES[lab]
        s0_map[labels == lab] = s0 * pd * np.exp(-TE_MS / t2)
    truth["S0"] = s0_map

    clean = np.zeros((*shape, prot.n_volumes))
    tissue = (labels == 4) | (labels == 5)
    if tissue.any():
        tp = {k: truth[k][tissue] for k in TRUTH_NAMES[model]}
        if model == "nexi":
            t_diff = prot.big_delta - prot.small_delta / 3.0 if wide_pulse else prot.big_delta
            sig = dispersed_nexi_signal(orientations[tissue], tp, prot.bvals, prot.bvecs, t_diff)
        elif model == "axcalibersmt":
            sig = dispersed_axcaliber_signal(
                orientations[tissue],
                tp,
                prot.bvals,
                prot.bvecs,
                prot.small_delta,
                prot.big_delta,
            )
        else:
            sig = dispersed_sandi_signal(
                orientations[tissue],
                tp,
                prot.bvals,
                prot.bvecs,
                prot.small_delta,
                prot.big_delta,
            )
        clean[tissue] = s0_map[tissue][:, None] * sig
    clean[csf] = s0_map[csf][:, None] * np.exp(-prot.bvals * FREE_WATER_D)[None]

    brain = labels > 0
    if model == "nexi":
        # the b → 0 apparent tensor (exact first cumulant of the Kärger signal)
        tens = np.zeros((*shape, 3, 3))
        tmat = np.einsum("...ki,...kj->...ij", orientations, orientations) / n_orientations
        f0 = np.nan_to_num(truth["f"])
        tens += (f0 * np.nan_to_num(truth["Dn"]))[..., None, None] * tmat
        tens += ((1 - f0) * np.nan_to_num(truth["De"]))[..., None, None] * np.eye(3)
        evals, evecs = tensor_eig(torch.as_tensor(tens))
        dmaps = {k: v.numpy() for k, v in tensor_maps(evals).items()}
        for k, v in dmaps.items():
            truth[k] = np.where(brain, v, np.nan)
        truth["V1"] = np.where(brain[..., None], evecs[..., :, 0].numpy(), np.nan)
    truth["direction"] = direction

    if snr is None:
        sigma, data = 0.0, clean
    else:
        sigma = float(s0_map[tissue].mean()) / float(snr) if tissue.any() else s0 / float(snr)
        data = add_noise(clean, sigma, kind="rician", seed=noise_seed)
    return DwiPhantom(
        data=data.astype(np.float32),
        bvals=prot.bvals,
        bvecs=prot.bvecs,
        small_delta=prot.small_delta,
        big_delta=prot.big_delta,
        mask=brain,
        labels=labels,
        tissues=dict(DWI_LABELS),
        truth=truth,
        orientations=orientations,
        sigma=sigma,
        snr=snr,
        affine=default_affine(shape),
        model=model,
    )
