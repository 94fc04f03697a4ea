"""NEXI (Jelescu et al. 2022): neurites as sticks exchanging water with an isotropic extracellular
space (Kärger model), fitted to rotational invariants (spherical mean, optionally l = 2).

For a neurite at angle θ to the gradient (ξ = cos θ), the two magnetisations obey Kärger's
equations over the diffusion time t with q² = b/t::

    d/dt [m_n, m_e] = −[[q²·D_n·ξ² + r_n, −r_e], [−r_n, q²·D_e + r_e]]·[m_n, m_e]

with r_e = r_n·f/(1 − f) (detailed balance) and [m_n, m_e](0) = [f, 1 − f], so
``S(ξ) = [1, 1]·exp(−M)·[f, 1 − f]`` with ``M = [[b·D_n·ξ² + r_n·t, −r_e·t], [−r_n·t, b·D_e + r_e·t]]``.
The 2×2 exponential is written in closed form (``exp(−M) = e^{−m}(cosh s·I − sinh(s)/s·(M − m·I))``,
m = tr M/2, s² = m² − det M), each term kept finite for any s. The spherical mean is
``K_0 = ∫₀¹ S(ξ) dξ`` and the l = 2 kernel ``K_2 = ∫₀¹ S(ξ)·P₂(ξ) dξ`` (Gauss–Legendre in ξ);
the model predicts ``S_0 = K_0`` and ``S_2 = −K_2·p₂`` (K_2 ≤ 0 here: S decreases with ξ), the
invariants of :func:`qmrkit.models.diffusion.rotational_invariants` of a dispersed neurite
population with orientation dispersion index p₂ (Novikov et al. 2018), all b0-normalised.

Diffusion time: t = Δ (narrow pulses, as Jelescu 2022) or, with ``wide_pulse=True``, t = Δ − δ/3.
Exchange time ``t_ex = (1 − f)/r_n`` (ms) is a derived map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import ParameterError, ShapeError
from ...fit.model import Model, Parameter

#: Gauss–Legendre nodes over ξ ∈ [0, 1]; 64 integrate b·D_n up to 60 to < 1e-10 (tests)
N_NODES = 64


def gauss_legendre_01(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of n-point Gauss–Legendre quadrature on [0, 1] (float64)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


def karger_signal(
    b: torch.Tensor,
    t: torch.Tensor,
    xi: torch.Tensor,
    f: torch.Tensor,
    dn: torch.Tensor,
    de: torch.Tensor,
    rn: torch.Tensor,
) -> torch.Tensor:
    """Kärger two-compartment signal for sticks at cos θ = ``xi`` (module docs).

    All inputs broadcast together (e.g. b, t ``(M, 1)``, xi ``(G,)``, parameters ``(V, 1, 1)``);
    b in ms/µm², t in ms, diffusivities µm²/ms, rn in 1/ms. Returns S/S(b=0).
    """
    # r_e·t = r_n·t·f/(1 − f); f → 1 leaves no extracellular space to exchange with
    rnt = rn * t
    ret = rnt * f / (1.0 - f).clamp_min(1e-12)
    a = b * dn * xi * xi + rnt
    d = b * de + ret
    half_diff = 0.5 * (a - d)
    m = 0.5 * (a + d)
    s2 = half_diff * half_diff + rnt * ret
    # eigenvalues m ± s, both >= 0; the clamp keeps sqrt's derivative finite where s = 0
    s = torch.sqrt(s2.clamp_min(1e-30))
    # [1, 1]·(M − m·I)·[f, 1 − f] = (a − d)/2·(2f − 1) − 2·r_n·t·f
    proj = half_diff * (2.0 * f - 1.0) - 2.0 * rnt * f
    e_lo, e_hi = torch.exp(-(m - s)), torch.exp(-(m + s))
    cosh_term = 0.5 * (e_lo + e_hi)
    # e^{−m}·sinh(s)/s: the difference of exponentials loses digits for small s, the series not
    small = s < 0.05
    s_safe = torch.where(small, torch.ones_like(s), s)
    series = torch.exp(-m) * (1.0 + s2 / 6.0 + s2 * s2 / 120.0)
    sinhc = torch.where(small, series, 0.5 * (e_lo - e_hi) / s_safe)
    return cosh_term - sinhc * proj


class NEXI(Model):
    """NEXI: neurite exchange imaging on b0-normalised rotational invariants (module docs).

    Parameters
    ----------
    b : (n_shells,) b-values in ms/µm² (one per shell, e.g. ``Invariants.b``).
    big_delta : (n_shells,) or float, gradient separation Δ in ms.
    small_delta : (n_shells,) or float, optional, gradient duration δ in ms (``wide_pulse``).
    orders : (0,) or (0, 2)
        Invariants fitted. The measurements are ordered shell by shell, each shell's orders in
        turn, i.e. ``Invariants.values.reshape(*spatial, -1)``. With l = 2 the model has the
        dispersion index ``p2`` as a fifth parameter.
    wide_pulse : bool
        Use t = Δ − δ/3 instead of t = Δ.
    n_nodes : int
        Gauss–Legendre nodes over cos θ.
    """

    name = "nexi"
    measurement_axis = "shell invariants (b, Δ, order)"
    map_names = {"f": "fn", "Dn": "Dn", "De": "De", "rn": "rn", "p2": "p2", "tex": "tex"}
    derived_units = {"tex": "ms"}

    _BASE = (
        Parameter("f", 0.0, 1.0, "", start=0.4, description="neurite signal fraction f_n"),
        Parameter("Dn", 0.01, 3.5, "µm²/ms", start=2.0, description="neurite (stick) diffusivity"),
        Parameter("De", 0.01, 3.5, "µm²/ms", start=0.8, description="extracellular diffusivity"),
        Parameter(
            "rn",
            1.0 / 250.0,
            1.0,
            "1/ms",
            start=0.05,
            log_scale=True,
            description="exchange rate neurite → extracellular",
        ),
    )
    _P2 = Parameter("p2", 0.0, 1.0, "", start=0.5, description="orientation dispersion index p₂")

    def __init__(
        self,
        b: Sequence[float],
        big_delta: Any,
        small_delta: Any = None,
        *,
        orders: Sequence[int] = (0,),
        wide_pulse: bool = False,
        n_nodes: int = N_NODES,
    ):
        bb = np.atleast_1d(np.asarray(b, dtype=np.float64))
        if bb.ndim != 1 or bb.size == 0 or not np.isfinite(bb).all() or (bb <= 0).any():
            raise ParameterError(
                f"b must be a non-empty list of positive b-values (ms/µm²), got {b}"
            )
        bd = np.broadcast_to(np.asarray(big_delta, dtype=np.float64), bb.shape).copy()
        if not np.isfinite(bd).all() or (bd <= 0).any():
            raise ParameterError(
                f"big_delta (Δ) must be positive ms, one per shell; got {big_delta}"
            )
        t = bd
        if wide_pulse:
            if small_delta is None:
                raise ParameterError("wide_pulse=True needs small_delta (δ, ms)")
            sd = np.broadcast_to(np.asarray(small_delta, dtype=np.float64), bb.shape)
            if (sd <= 0).any() or (sd >= 3 * bd).any():
                raise ParameterError(f"small_delta must be in (0, 3Δ) ms, got {small_delta}")
            t = bd - sd / 3.0
        self.orders = tuple(int(o) for o in orders)
        if self.orders not in ((0,), (0, 2)):
            raise ParameterError(f"orders must be (0,) or (0, 2), got {tuple(orders)}")
        if int(n_nodes) < 8:
            raise ParameterError(f"n_nodes must be >= 8, got {n_nodes}")
        self.parameters = self._BASE + ((self._P2,) if 2 in self.orders else ())
        xi, w = gauss_legendre_01(int(n_nodes))
        super().__init__(b=bb, t=t, xi=xi, w=w, p2_weight=w * 0.5 * (3 * xi * xi - 1))

    @classmethod
    def from_invariants(cls, inv: Any, **kwargs: Any) -> NEXI:
        """A NEXI model matching ``Invariants`` (its shells, Δ, δ and orders ≤ 2)."""
        if np.isnan(inv.big_delta).any():
            raise ShapeError("the invariants have no Δ (give big_delta to rotational_invariants)")
        orders = kwargs.pop("orders", tuple(o for o in inv.orders if o <= 2))
        sd = None if np.isnan(inv.small_delta).any() else inv.small_delta
        return cls(inv.b, inv.big_delta, sd, orders=orders, **kwargs)

    def kernels(self, p: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``K_0`` and ``K_2`` per shell, each ``(V, n_shells)``."""
        col = {k: p[k][..., None] for k in ("f", "Dn", "De", "rn")}  # (V, 1, 1)
        s = karger_signal(
            self.b[:, None], self.t[:, None], self.xi, col["f"], col["Dn"], col["De"], col["rn"]
        )  # (V, n_shells, G)
        return s @ self.w, s @ self.p2_weight

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        k0, k2 = self.kernels(p)
        if self.orders == (0,):
            return k0
        return torch.stack([k0, -k2 * p["p2"]], dim=-1).flatten(-2)

    def derived(self, p):
        return {"tex": ((1.0 - p["f"]) / p["rn"]).reshape(-1)}
