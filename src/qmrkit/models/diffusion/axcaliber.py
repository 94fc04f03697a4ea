"""AxCaliberSMT (Fan et al., NeuroImage 2020): axon diameter from the spherical mean signal.

Per shell (b, δ, Δ) the b0-normalised spherical mean is

    Ŝ = (1 − f_csf)·[f·Ŝ_r + (1 − f)·Ŝ_h] + f_csf·exp(−b·D_csf)

* Ŝ_r: intra-axonal water in cylinders of diameter ``a`` (µm): free along the axis (D_a), and
  across it the Van Gelderen (1994) Gaussian-phase attenuation exp(−b·sin²θ·D_eff(a/2, D0, δ, Δ))
  with intrinsic diffusivity D0 (:mod:`.restricted`), so Ŝ_r is the axially symmetric spherical
  mean with D∥ = D_a, D⊥ = D_eff (:mod:`.compartments`, erf form);
* Ŝ_h: hindered extra-axonal water, a zeppelin with D∥ = D_e,∥ and fitted D⊥ = ``DeR``;
* free water (CSF) with D_csf = 3.0 µm²/ms.

Defaults follow Fan 2020 and GACELLE (paper 004): D0 = D_a = D_e,∥ = 1.7 µm²/ms, D_csf = 3.0.

**Fractions.** The fitted ``f`` is the intra-axonal fraction of the non-CSF signal,
f = f_r/(f_r + f_h) (GACELLE's convention), and ``fcsf`` the free-water fraction; both in [0, 1]
so any (f, fcsf) in the box gives physical fractions f_r + f_h + f_csf = 1 with each ≥ 0, and
``lm``/``adam``/``mcmc`` need nothing but box bounds. The physical fractions are derived maps:
``fr = f·(1 − fcsf)``, ``fh = (1 − f)·(1 − fcsf)``.

Measurements: one spherical mean per shell, in the order of ``b`` (for
:class:`~qmrkit.models.diffusion.Invariants`: ``inv.order(0)``, see :meth:`from_invariants`).

**Start and recovery.** :meth:`AxCaliberSMT.initial_guess` searches a grid of (a, D_e,⊥) with the
three fractions solved exactly on the simplex at every point (a random dictionary start stalls at
small a, where the signal hardly depends on it). Noise-free, Fan 2020's protocol, 2000 random
voxels (a 1–12 µm, f 0.3–0.9, f_csf 0–0.3, D_e,⊥ 0.2–1.4): ``lm`` recovers every parameter to
< 2e-11 in float64; in float32 the median error in a is 2e-5 for a ∈ [1, 2) µm (1 voxel of 168
lost, error 0.94) and ≤ 3e-6 above 2 µm.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import BoundsError, ParameterError, ShapeError, UnitsWarning
from ...fit.model import Model, Parameter
from .compartments import axisymmetric_spherical_mean, grid, simplex_grid_search
from .restricted import (
    gpa_deff,
    gpa_deff_from_series,
    gpa_series,
    roots_needed,
    series_counts,
    taylor_coefficients,
)


def shell_protocol(
    b: Any, small_delta: Any, big_delta: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated per-shell (b, δ, Δ) float64 arrays; δ and Δ may be scalars (one for all)."""
    bb = np.atleast_1d(np.asarray(b, dtype=np.float64))
    if bb.ndim != 1 or bb.size == 0 or not np.isfinite(bb).all() or (bb <= 0).any():
        raise ParameterError(
            f"b must be a non-empty 1-D list of positive b-values (ms/µm²), got {b}"
        )
    out = []
    for name, v in (("small_delta (δ)", small_delta), ("big_delta (Δ)", big_delta)):
        if v is None:
            raise ParameterError(f"{name} is needed (ms, one per shell or one for all)")
        arr = np.asarray(v, dtype=np.float64)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.size not in (1, bb.size)):
            raise ShapeError(
                f"{name} must be a scalar or have one value per shell ({bb.size}), got shape "
                f"{arr.shape}"
            )
        arr = np.broadcast_to(arr.reshape(-1) if arr.ndim else arr, bb.shape).copy()
        if not np.isfinite(arr).all() or (arr <= 0).any():
            raise ParameterError(f"{name} must be positive finite ms, got {v}")
        out.append(arr)
    sd, bd = out
    if (bd < sd).any():
        raise ParameterError(f"big_delta (Δ) must be >= small_delta (δ); got Δ={bd}, δ={sd} (ms)")
    # the usual unit slips: b in s/mm² (the .bval file's unit) and times in seconds (BIDS JSON)
    if bb.max() > 100.0:
        warnings.warn(
            f"b = {np.round(bb, 3).tolist()} look like s/mm²; qmrkit expects ms/µm² (divide by "
            "1000); fitting as given",
            UnitsWarning,
            stacklevel=3,
        )
    if bd.max() < 1.0:
        warnings.warn(
            f"big_delta = {np.round(bd, 4).tolist()} look like seconds; qmrkit expects ms; "
            "fitting as given",
            UnitsWarning,
            stacklevel=3,
        )
    return bb, sd, bd


def _positive(name: str, value: float) -> float:
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ParameterError(f"{name} must be a positive diffusivity (µm²/ms), got {value}")
    return v


def _bounds(name: str, value: Sequence[float], unit: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be (lower, upper) in {unit}, got {value!r}") from None
    if not (0 < lo < hi < np.inf):
        raise ParameterError(f"{name} must satisfy 0 < lower < upper < inf ({unit}), got {value}")
    return lo, hi


#: grid starts keep fractions in [m, 1 − m] (see :func:`_grid_start`)
START_FRACTION_MARGIN = 0.01


def _grid_start(
    model: Model,
    data: torch.Tensor,
    axes: Mapping[str, int],
    order: tuple[str, str, str],
    fraction_names: tuple[str, str],
    keep: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Grid search over the nonlinear parameters ``axes`` (name → points, linear between the
    bounds) with exact simplex fractions (:func:`.compartments.simplex_grid_search`).

    ``order`` names the compartments (keys of ``model.compartments``) as (first, second, the one
    whose fraction is written absolutely); the returned fractions are (first's share of the
    first two, third's absolute): for AxCaliberSMT f = w₁/(w₁ + w₂), fcsf = w₃. ``keep`` (grid
    values → bool mask) restricts the grid.
    """
    names = list(axes)
    pts = [grid(model.parameter(n).lower, model.parameter(n).upper, axes[n]) for n in names]
    flat = {n: m.reshape(-1) for n, m in zip(names, np.meshgrid(*pts, indexing="ij"), strict=True)}
    if keep is not None:
        sel = np.asarray(keep(flat), dtype=bool)
        flat = {n: v[sel] for n, v in flat.items()}
    kw = {"dtype": data.dtype, "device": data.device}
    vals = {n: torch.as_tensor(v[:, None], **kw) for n, v in flat.items()}
    # the fractions do not enter the compartments: fill them with anything valid
    p = {q.name: torch.full_like(vals[names[0]], q.typical()) for q in model.parameters}
    p.update(vals)
    with torch.no_grad():
        comp = model.compartments(p)
    s1, s2, s3 = (comp[k].to(**kw) for k in order)
    idx, w = simplex_grid_search(data.real if data.is_complex() else data, s1, s2, s3)
    pair = w[:, 0] + w[:, 1]
    rel = torch.where(pair > 0, w[:, 0] / pair.clamp_min(torch.finfo(w.dtype).tiny), 0.5)
    out = {n: vals[n][idx, 0] for n in names}
    # kept off 0 and 1: at f = 0 a compartment's own parameters (e.g. its diffusivity) do not
    # change the signal, the Jacobian is singular there and lm can stall at the start
    out[fraction_names[0]] = rel.clamp(START_FRACTION_MARGIN, 1 - START_FRACTION_MARGIN)
    out[fraction_names[1]] = w[:, 2].clamp(START_FRACTION_MARGIN, 1 - START_FRACTION_MARGIN)
    return out


class RestrictedSeriesMixin:
    """Binds the float64 constants of a GPA series as acquisition settings (cast by ``.to``)."""

    @classmethod
    def from_invariants(cls, inv: Any, **kwargs: Any) -> Any:
        """A model matching ``Invariants`` (its shells' b, δ, Δ); fit it to ``inv.order(0)``."""
        if np.isnan(inv.small_delta).any() or np.isnan(inv.big_delta).any():
            raise ShapeError(
                "the invariants have no δ/Δ: give small_delta and big_delta (ms) to "
                "rotational_invariants"
            )
        return cls(inv.b, inv.small_delta, inv.big_delta, **kwargs)

    def _series_settings(
        self,
        geometry: str,
        radius_max: float,
        d0: float,
        sd: np.ndarray,
        bd: np.ndarray,
        n_roots: int | None,
    ) -> dict[str, Any]:
        n = (
            roots_needed(geometry, radius_max, d0, float(sd.min()), float((bd - sd).min()))
            if n_roots is None
            else int(n_roots)
        )
        if n < 1:
            raise ParameterError(f"n_roots must be >= 1, got {n_roots}")
        series = gpa_series(geometry, n)
        self.n_roots = n
        self._n_taylor, self._n_phi = series_counts(
            geometry, radius_max, d0, float(sd.min()), float((sd + bd).min()), n
        )
        return {
            "roots": series.roots,
            "weights": series.weights,
            "tail1": series.tail1,
            "tail2": series.tail2,
            "coeffs": taylor_coefficients(sd, bd),
        }

    def simulate(self, params: Mapping[str, Any], **inputs: Any) -> torch.Tensor:
        """:meth:`Model.simulate`, refusing values outside the bounds (a fraction above 1 or a
        negative radius has no physical signal) with :class:`~qmrkit.errors.BoundsError`."""
        for q in self.parameters:
            if q.name not in params:
                continue
            v = params[q.name]
            v = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=float)
            if not np.isfinite(v).all() or v.min() < q.lower or v.max() > q.upper:
                raise BoundsError(
                    f"{self.name}.simulate: {q.name} must lie in [{q.lower:g}, {q.upper:g}] "
                    f"{q.unit}; got values in [{np.nanmin(v):g}, {np.nanmax(v):g}]"
                )
        return super().simulate(params, **inputs)

    def _deff(self, radius: torch.Tensor, d0: float) -> torch.Tensor:
        """D_eff (V, S) for radii (V, 1) µm at every shell."""
        series = {k: self._bound[k] for k in ("roots", "weights", "tail1", "tail2")}
        r = radius.expand(radius.shape[0], self.b.shape[0])
        return gpa_deff_from_series(
            series,
            r,
            d0,
            self.small_delta,
            self.big_delta,
            self.coeffs,
            n_taylor=self._n_taylor,
            n_phi=self._n_phi,
        )


class AxCaliberSMT(RestrictedSeriesMixin, Model):
    """AxCaliberSMT: axon diameter, intra-axonal and free-water fractions (module docs).

    Parameters
    ----------
    b : (n_shells,) b-values, ms/µm².
    small_delta, big_delta : (n_shells,) or float, gradient duration δ and separation Δ, ms.
    Da : float
        Intra-axonal axial diffusivity, µm²/ms (1.7).
    DeL : float, optional
        Extra-axonal axial diffusivity D_e,∥ (default: ``Da``); also the upper bound of ``DeR``
        (a prolate zeppelin, as GACELLE).
    D0 : float, optional
        Intrinsic diffusivity of the restricted intra-axonal water across the axon (default:
        ``Da``).
    Dcsf : float
        Free-water diffusivity, µm²/ms (3.0).
    diameter_bounds : (float, float)
        Bounds of ``a`` in µm ((0.1, 20), as GACELLE).
    n_roots : int, optional
        Explicit Bessel roots (default: :func:`~.restricted.roots_needed` for the largest
        diameter, D0 and the protocol's shortest δ and Δ − δ).

    Notes
    -----
    Parameters: ``a`` (µm, axon diameter), ``f`` (f_r/(f_r + f_h)), ``fcsf``, ``DeR`` (µm²/ms).
    Derived maps: ``fr``, ``fh`` (physical signal fractions). The signal is insensitive to
    diameters below the protocol's resolution limit (a few µm on 300 mT/m gradients), where ``a``
    is poorly determined by any solver.
    """

    name = "axcalibersmt"
    measurement_axis = "shell spherical means (b, δ, Δ)"
    map_names = {
        "a": "AxonDiameter",
        "f": "fIntraAxonalRel",
        "fcsf": "fCSF",
        "DeR": "DeRadial",
        "fr": "fIntraAxonal",
        "fh": "fExtraAxonal",
    }
    derived_units = {"fr": "", "fh": ""}
    #: points of the start grid in ``a`` and ``DeR`` (:meth:`initial_guess`)
    start_grid = (40, 24)

    def __init__(
        self,
        b: Sequence[float],
        small_delta: Any,
        big_delta: Any,
        *,
        Da: float = 1.7,
        DeL: float | None = None,
        D0: float | None = None,
        Dcsf: float = 3.0,
        diameter_bounds: Sequence[float] = (0.1, 20.0),
        n_roots: int | None = None,
    ):
        bb, sd, bd = shell_protocol(b, small_delta, big_delta)
        self.Da = _positive("Da", Da)
        self.DeL = _positive("DeL", self.Da if DeL is None else DeL)
        self.D0 = _positive("D0", self.Da if D0 is None else D0)
        self.Dcsf = _positive("Dcsf", Dcsf)
        a_lo, a_hi = _bounds("diameter_bounds", diameter_bounds, "µm")
        self.parameters = (
            Parameter(
                "a",
                a_lo,
                a_hi,
                "µm",
                start=min(max(3.0, a_lo), a_hi),
                log_scale=True,
                description="axon diameter",
            ),
            Parameter(
                "f", 0.0, 1.0, "", start=0.7, description="intra-axonal fraction f_r/(f_r + f_h)"
            ),
            Parameter("fcsf", 0.0, 1.0, "", start=0.1, description="free-water (CSF) fraction"),
            Parameter(
                "DeR",
                min(0.01, 0.5 * self.DeL),
                self.DeL,
                "µm²/ms",
                start=0.5 * self.DeL,
                description="radial diffusivity of the extra-axonal zeppelin",
            ),
        )
        acq = self._series_settings("cylinder", 0.5 * a_hi, self.D0, sd, bd, n_roots)
        # D_eff < D0 always, and grows with the radius: the cylinder can only be oblate
        # (D_eff > D_a, needing the quadrature branch) when D0 > D_a
        r_max = torch.tensor(0.5 * a_hi, dtype=torch.float64)
        deff_max = gpa_deff("cylinder", r_max, self.D0, sd, bd, n_roots=self.n_roots)
        self._oblate_r = bool((deff_max > self.Da).any())
        super().__init__(b=bb, small_delta=sd, big_delta=bd, **acq)

    def initial_guess(self, data: torch.Tensor, inputs: Mapping[str, torch.Tensor]):
        """Grid start: ``a`` × ``DeR`` on :attr:`start_grid` points (linear in each), and for every
        grid point the three fractions that fit best on the simplex (exact, non-negative, summing
        to 1); the best grid point per voxel wins. ``lm`` then refines it. Why not the generic
        random dictionary: below the resolution limit the signal hardly depends on ``a``, so a
        start there stalls; the grid samples ``a`` evenly and the fractions need no sampling."""
        axes = {"a": self.start_grid[0], "DeR": self.start_grid[1]}
        return _grid_start(self, data, axes, ("restricted", "hindered", "free"), ("f", "fcsf"))

    def compartments(self, p: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Spherical means (V, n_shells) of the restricted, hindered and free compartments."""
        deff = self._deff(0.5 * p["a"], self.D0)
        b = self.b
        return {
            "restricted": axisymmetric_spherical_mean(b, self.Da, deff, oblate=self._oblate_r),
            "hindered": axisymmetric_spherical_mean(b, self.DeL, p["DeR"], oblate=False),
            "free": torch.exp(-b * self.Dcsf).expand_as(deff),
        }

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        c = self.compartments(p)
        f, fcsf = p["f"], p["fcsf"]
        return (1.0 - fcsf) * (f * c["restricted"] + (1.0 - f) * c["hindered"]) + fcsf * c["free"]

    def derived(self, p):
        tissue = 1.0 - p["fcsf"]
        return {"fr": (p["f"] * tissue).reshape(-1), "fh": ((1.0 - p["f"]) * tissue).reshape(-1)}
