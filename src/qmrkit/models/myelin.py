"""Myelin water imaging from gradient-echo data: three-pool complex GRE and MCR-MWI.

Two models, both fitted to *complex* multi-echo GRE data (magnitude and phase), with the myelin
water fraction (MWF) as a derived or fitted map:

* :class:`ThreePoolGRE` — the complex three-pool model of Nam et al. (NeuroImage 2015): myelin
  (MW), axonal (AW) and extracellular (EW) water, each with an amplitude, a T2* and (MW, AW) a
  frequency shift relative to EW, times a common background frequency and phase.
* :class:`McrMwi` — multi-compartment relaxometry (Chan & Marques, NeuroImage 2020): multi-echo ×
  variable-flip-angle GRE, where each flip angle's compartment amplitudes carry T1 weighting from
  the steady state of two exchanging pools (MW and intra-/extra-cellular water, IEW) computed by
  EPG-X (:func:`qmrkit.mrf.epgx_spgr`) — directly, or through a neural-network surrogate
  (:func:`train_mcr_mwi_surrogate`, as in GACELLE's demo 3), with a B1 map as covariate.

Signal of :class:`ThreePoolGRE` at echo time t (ms; frequencies in Hz, so 2π·f·t/1000 rad)::

    S(t) = [A_MW e^{−t/T2*_MW + i2πΔf_MW t} + A_AW e^{−t/T2*_AW + i2πΔf_AW t} + A_EW e^{−t/T2*_EW}]
           · e^{i(2π f_bg t + φ0)}

:class:`McrMwi` replaces the amplitudes by ``S0 · s_p(α·B1)``: ``s_MW`` and ``s_IEW`` are the
complex steady-state signals (pool sizes MWF and 1 − MWF included) of the two-pool EPG-X system with
T1_MW, T2_MW (fixed, default 234 ms and 15 ms, as in GACELLE), T1_IEW (fitted), T2_IEW (fixed,
default 64 ms; it only sets how imperfect RF spoiling is) and exchange rate k_IEW→MW (fitted, 1/s);
IEW splits into AW (share ``fAW``) and EW. Assumptions (the original papers are not reproduced
here): one common initial phase for all flip angles; exchange acts on the steady state only, not
during the echo train (whose decay is the analytic T2* term); MW and IEW have the same proton
density; measurements are ordered flip-angle-major (``index = i_fa·n_te + i_te``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError, ParameterError
from ..fit.model import Model, Parameter
from ..fit.surrogate import Surrogate, train_surrogate
from ..mrf.epgx import epgx_spgr, spgr_two_pool_steady_state

__all__ = ["ThreePoolGRE", "McrMwi", "train_mcr_mwi_surrogate", "mcr_epgx_correction"]

_TWO_PI_MS = 2 * math.pi / 1000.0  # Hz·ms -> rad


def _vector(name: str, x: Any, n_min: int = 1) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size < n_min or not np.all(np.isfinite(arr)):
        raise ParameterError(f"{name} must be {n_min} or more finite values, got {x!r}")
    return arr


def _phase_start(z: torch.Tensor, te: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Background frequency (Hz) and phase at t = 0 (rad) from the first two echoes of complex
    data ``z (V, n_te)``: the phase of S(t2)·conj(S(t1)) over Δt (unambiguous for |f| < 1/(2Δt))."""
    dt = float(te[1] - te[0])
    f = torch.angle(z[:, 1] * z[:, 0].conj()) / (_TWO_PI_MS * dt)
    ph = torch.angle(z[:, 0] * torch.exp(-1j * _TWO_PI_MS * f * float(te[0])).to(z.dtype))
    return f, ph


def _fixed_split(params, fixed):
    """Parameters left free after holding ``fixed`` (name -> value, physical units) constant."""
    fixed = {k: float(v) for k, v in (fixed or {}).items()}
    names = [q.name for q in params]
    unknown = [k for k in fixed if k not in names]
    if unknown:
        raise ParameterError(f"cannot fix {unknown}: not parameters of the model {names}")
    amp = [k for k in fixed if next(q for q in params if q.name == k).amplitude]
    if amp:
        raise ParameterError(
            f"amplitude parameters {amp} cannot be fixed (their scale is the data's)"
        )
    return tuple(q for q in params if q.name not in fixed), fixed


def _with_fixed(p, fixed):
    if not fixed:
        return p
    ref = next(iter(p.values()))
    out = dict(p)
    for k, v in fixed.items():
        out[k] = torch.full((ref.shape[0], 1), v, dtype=ref.real.dtype, device=ref.device)
    return out


class ThreePoolGRE(Model):
    """Three-pool complex multi-echo GRE myelin water model (Nam et al. 2015).

    Parameters
    ----------
    te : sequence of float
        Echo times in ms (≥ 4; myelin water needs several echoes below ~15 ms).
    fixed : dict, optional
        Non-amplitude parameters held constant (physical units), e.g. literature frequency
        shifts ``{"df_MW": 5.0, "df_AW": -2.0}``: ten free parameters are poorly conditioned at
        common SNRs, and fixing some is the usual remedy.

    Notes
    -----
    Parameters: amplitudes ``A_MW``, ``A_AW``, ``A_EW`` (data units), ``T2s_MW`` (1–25 ms),
    ``T2s_AW`` and ``T2s_EW`` (25–200 ms), frequency shifts ``df_MW`` and ``df_AW`` relative to EW
    (Hz), background frequency ``f_bg`` (Hz) and phase ``phi0`` (rad). Derived: ``MWF`` =
    A_MW / (A_MW + A_AW + A_EW). Fit to complex data.
    """

    name = "three-pool-gre"
    measurement_axis = "echo times (te)"
    complex_data = True  # fitted to magnitude and phase (the CLI checks the input)
    parameters = (
        Parameter("A_MW", 0.0, 10.0, "a.u.", amplitude=True, description="myelin water amplitude"),
        Parameter("A_AW", 0.0, 10.0, "a.u.", amplitude=True, description="axonal water amplitude"),
        Parameter(
            "A_EW", 0.0, 10.0, "a.u.", amplitude=True, description="extracellular water amplitude"
        ),
        Parameter("T2s_MW", 1.0, 25.0, "ms", start=10.0, description="myelin water T2*"),
        Parameter("T2s_AW", 25.0, 200.0, "ms", start=64.0, description="axonal water T2*"),
        Parameter("T2s_EW", 25.0, 200.0, "ms", start=48.0, description="extracellular water T2*"),
        Parameter("df_MW", -25.0, 40.0, "Hz", start=5.0, description="myelin water shift vs EW"),
        Parameter("df_AW", -25.0, 25.0, "Hz", start=-2.0, description="axonal water shift vs EW"),
        Parameter("f_bg", -500.0, 500.0, "Hz", start=0.0, description="background frequency"),
        Parameter("phi0", -2 * math.pi, 2 * math.pi, "rad", start=0.0, description="phase at TE=0"),
    )
    map_names = {"MWF": "MWFmap"}
    derived_units = {"MWF": ""}

    def __init__(self, te: Sequence[float], fixed: Mapping[str, float] | None = None):
        te_arr = _vector("te", te, n_min=4)
        if np.any(np.diff(te_arr) <= 0):
            raise ParameterError(f"te must increase strictly (ms), got {te_arr.tolist()}")
        self.parameters, self.fixed = _fixed_split(type(self).parameters, fixed)
        super().__init__(te=te_arr)

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        p = _with_fixed(p, self.fixed)
        te = self.te
        w = _TWO_PI_MS * te
        mw = p["A_MW"] * torch.exp(torch.complex(-te / p["T2s_MW"], w * p["df_MW"]))
        aw = p["A_AW"] * torch.exp(torch.complex(-te / p["T2s_AW"], w * p["df_AW"]))
        ew = p["A_EW"] * torch.exp(
            torch.complex(-te / p["T2s_EW"], torch.zeros_like(w * p["A_EW"]))
        )
        bg = torch.exp(torch.complex(torch.zeros_like(w * p["f_bg"]), w * p["f_bg"] + p["phi0"]))
        return (mw + aw + ew) * bg

    def initial_guess(self, data, inputs):
        if not data.is_complex():
            raise ModelError("ThreePoolGRE fits complex GRE data (magnitude and phase)")
        f, ph = _phase_start(data, self.te)
        s0 = data[:, 0].abs() * math.exp(float(self.te[0]) / 40.0)
        out = {
            "A_MW": 0.1 * s0,
            "A_AW": 0.6 * s0,
            "A_EW": 0.3 * s0,
            "T2s_MW": torch.full_like(s0, 10.0),
            "T2s_AW": torch.full_like(s0, 64.0),
            "T2s_EW": torch.full_like(s0, 48.0),
            "df_MW": torch.full_like(s0, 5.0),
            "df_AW": torch.full_like(s0, -2.0),
            "f_bg": f.clamp(-499.0, 499.0),
            "phi0": ph,
        }
        return {k: v for k, v in out.items() if k not in self.fixed}

    def derived(self, p):
        p = _with_fixed(p, self.fixed)
        total = p["A_MW"] + p["A_AW"] + p["A_EW"]
        return {"MWF": (p["A_MW"] / total.clamp_min(1e-30)).reshape(-1)}


# ------------------------------------------------------------------------------------------------
# MCR-MWI
# ------------------------------------------------------------------------------------------------
#: default training ranges of the MCR-MWI EPG-X surrogate (physical units)
MCR_RANGES: dict[str, tuple[float, float, str, str]] = {
    "MWF": (0.01, 0.4, "lin", ""),
    "T1_IEW": (500.0, 2500.0, "log", "ms"),
    "k_IEW": (0.0, 10.0, "lin", "1/s"),
    "alpha": (1.0, 80.0, "lin", "deg"),
}


def mcr_epgx_correction(
    p: Mapping[str, torch.Tensor],
    tr: float,
    t1_mw: float = 234.0,
    t2_mw: float = 15.0,
    t2_iew: float = 64.0,
    spoil_increment: float = 50.0,
    tol: float = 1e-4,
) -> torch.Tensor:
    """EPG-X steady state minus the ideal-spoiling closed form, per pool (the surrogate's target).

    Learning only this correction (GACELLE, suppl. A) leaves the large, exactly known part of the
    signal to :func:`~qmrkit.mrf.spgr_two_pool_steady_state`, so a small network reaches a small
    error relative to the signal.

    Parameters
    ----------
    p : dict
        ``MWF``, ``T1_IEW`` (ms), ``k_IEW`` (1/s), ``alpha`` (effective flip angle, deg), each
        ``(n,)``.
    tr, t1_mw, t2_mw, t2_iew : float
        ms. spoil_increment: degrees.

    Returns
    -------
    Tensor (n, 4)
        ``[Re s_IEW − BM_IEW, Im s_IEW, Re s_MW − BM_MW, Im s_MW]``.
    """
    f, t1, k, a = (p[n].reshape(-1) for n in ("MWF", "T1_IEW", "k_IEW", "alpha"))
    # one flip angle of 1° scaled per sample by "b1" = α: every sample has its own flip angle
    ep = epgx_spgr(
        [1.0], tr, t1, t2_iew, t1_mw, t2_mw, f, k, b1=a, spoil_increment=spoil_increment, tol=tol
    )[:, 0]
    bm = spgr_two_pool_steady_state([1.0], tr, t1, t1_mw, f, k, b1=a, dtype=ep.real.dtype)[:, 0]
    return torch.stack(
        [ep[:, 0].real - bm[:, 0], ep[:, 0].imag, ep[:, 1].real - bm[:, 1], ep[:, 1].imag], dim=-1
    )


def _mcr_sim(p, tr, t1_mw, t2_mw, t2_iew, spoil_increment, tol):
    return mcr_epgx_correction(p, tr, t1_mw, t2_mw, t2_iew, spoil_increment, tol)


def train_mcr_mwi_surrogate(
    tr: float,
    *,
    t1_mw: float = 234.0,
    t2_mw: float = 15.0,
    t2_iew: float = 64.0,
    spoil_increment: float = 50.0,
    ranges: Mapping[str, Any] | None = None,
    tol: float = 1e-4,
    **train_kwargs: Any,
) -> Surrogate:
    """Train the EPG-X correction surrogate used by :class:`McrMwi` for one sequence.

    Inputs ``MWF``, ``T1_IEW`` (ms), ``k_IEW`` (1/s), ``alpha`` (effective flip angle, deg) over
    ``ranges`` (default :data:`MCR_RANGES`); outputs the 4 corrections of
    :func:`mcr_epgx_correction`. The fixed settings (``tr``, T1/T2 of the pools, spoiling) are
    stored as the surrogate's acquisition and checked by :class:`McrMwi`. ``train_kwargs`` go to
    :func:`~qmrkit.fit.train_surrogate` (defaults here: 4096 samples, hidden (64, 64, 64)).
    """
    rng = dict(MCR_RANGES if ranges is None else ranges)
    missing = set(MCR_RANGES) - set(rng)
    if missing:
        raise ParameterError(f"ranges must give {sorted(MCR_RANGES)}; missing {sorted(missing)}")
    kw = {"n_train": 4096, "hidden": (64, 64, 64), "progress": False}
    kw.update(train_kwargs)
    acq = {
        "tr": float(tr),
        "t1_mw": float(t1_mw),
        "t2_mw": float(t2_mw),
        "t2_iew": float(t2_iew),
        "spoil_increment": float(spoil_increment),
        "tol": float(tol),
    }
    return train_surrogate(_mcr_sim, rng, acquisition=acq, **kw)


class McrMwi(Model):
    """Multi-compartment relaxometry myelin water imaging (Chan & Marques 2020), complex data.

    Parameters
    ----------
    flip_angles : sequence of float
        Nominal flip angles in degrees (≥ 2).
    te : sequence of float
        Echo times in ms (≥ 4), the same for every flip angle.
    tr : float
        Repetition time in ms.
    surrogate : Surrogate, path or None
        EPG-X correction surrogate from :func:`train_mcr_mwi_surrogate` for this TR and these
        fixed pool settings (checked); None simulates EPG-X directly in every forward pass
        (exact, differentiable, slow — the reference the surrogate is compared against).
    t1_mw, t2_mw, t2_iew : float
        Fixed myelin-water T1 and T2 and IEW T2 in ms (EPG-X settings).
    spoil_increment : float
        RF-spoiling phase increment in degrees.
    b1 : map or float, optional
        Transmit field as a fraction of nominal (per-voxel covariate).
    n_tr : int, optional
        Pulses simulated by the direct EPG-X (default from ``tol`` = 1e-4).
    fixed : dict, optional
        Non-amplitude parameters held constant (physical units), e.g. ``{"k_IEW": 2.0}``.

    Notes
    -----
    Parameters: ``S0`` (data units), ``MWF``, ``fAW`` (share of IEW that is axonal), ``T2s_MW``,
    ``T2s_AW``, ``T2s_EW`` (ms), ``T1_IEW`` (ms), ``k_IEW`` (1/s, IEW → MW exchange), ``df_MW``,
    ``df_AW``, ``f_bg`` (Hz) and ``phi0`` (rad). Derived: ``AWF``, ``EWF``. Data are ordered
    flip-angle-major: ``(*spatial, n_fa·n_te)`` with index ``i_fa·n_te + i_te``.
    """

    name = "mcr-mwi"
    complex_data = True
    covariates = ("b1",)
    measurement_axis = "flip angles × echo times"
    map_names = {"MWF": "MWFmap", "T1_IEW": "T1map"}
    derived_units = {"AWF": "", "EWF": ""}

    def __init__(
        self,
        flip_angles: Sequence[float],
        te: Sequence[float],
        tr: float,
        surrogate: Surrogate | str | Path | None = None,
        *,
        t1_mw: float = 234.0,
        t2_mw: float = 15.0,
        t2_iew: float = 64.0,
        spoil_increment: float = 50.0,
        b1: Any = None,
        n_tr: int | None = None,
        fixed: Mapping[str, float] | None = None,
    ):
        fa = _vector("flip_angles", flip_angles, n_min=2)
        te_arr = _vector("te", te, n_min=4)
        if np.any(np.diff(te_arr) <= 0):
            raise ParameterError(f"te must increase strictly (ms), got {te_arr.tolist()}")
        if not (isinstance(tr, (int, float, np.floating)) and tr > 0):
            raise ParameterError(f"tr must be a positive number of ms, got {tr!r}")
        if isinstance(surrogate, (str, Path)):
            surrogate = Surrogate.load(surrogate)
        self.fixed_settings = {
            "tr": float(tr),
            "t1_mw": float(t1_mw),
            "t2_mw": float(t2_mw),
            "t2_iew": float(t2_iew),
            "spoil_increment": float(spoil_increment),
        }
        rng = dict(MCR_RANGES)
        if surrogate is not None:
            if not isinstance(surrogate, Surrogate):
                raise ModelError(
                    f"surrogate must be a Surrogate, a path or None, got {type(surrogate).__name__}"
                )
            if set(surrogate.input_names) != set(MCR_RANGES) or surrogate.n_out != 4:
                raise ModelError(
                    f"surrogate has inputs {surrogate.input_names} and {surrogate.n_out} outputs; "
                    "McrMwi needs one from train_mcr_mwi_surrogate (MWF, T1_IEW, k_IEW, alpha -> 4)"
                )
            for k, v in self.fixed_settings.items():
                got = surrogate.acquisition.get(k)
                if got is None or not math.isclose(float(got), v, rel_tol=1e-9):
                    raise ModelError(
                        f"surrogate was trained for {k} = {got}, but this protocol has {k} = {v}; "
                        "train one with train_mcr_mwi_surrogate for this protocol"
                    )
            rng = {r.name: (r.lower, r.upper) for r in surrogate.ranges}
            a_lo, a_hi = rng["alpha"]
            if fa.min() < a_lo or fa.max() > a_hi:
                raise ModelError(
                    f"flip angles {fa.tolist()} lie outside the surrogate's range [{a_lo}, {a_hi}] "
                    "deg (B1 scales them further)"
                )
        self.surrogate = surrogate
        self.n_tr = n_tr
        self.n_fa, self.n_te = fa.size, te_arr.size
        mlo, mhi = rng["MWF"][0], rng["MWF"][1]
        self.parameters = (
            Parameter("S0", 0.0, 100.0, "a.u.", amplitude=True, description="proton density"),
            Parameter(
                "MWF",
                max(mlo, 1e-3),
                min(mhi, 0.6),
                "",
                start=0.1,
                description="myelin water fraction",
            ),
            Parameter("fAW", 0.0, 1.0, "", start=0.6, description="axonal share of IEW"),
            Parameter("T2s_MW", 1.0, 25.0, "ms", start=10.0, description="myelin water T2*"),
            Parameter("T2s_AW", 25.0, 200.0, "ms", start=64.0, description="axonal water T2*"),
            Parameter("T2s_EW", 25.0, 200.0, "ms", start=48.0, description="extracellular T2*"),
            Parameter(
                "T1_IEW",
                float(rng["T1_IEW"][0]),
                float(rng["T1_IEW"][1]),
                "ms",
                start=1000.0,
                log_scale=True,
                description="IEW T1",
            ),
            Parameter(
                "k_IEW",
                float(rng["k_IEW"][0]),
                float(rng["k_IEW"][1]),
                "1/s",
                start=2.0,
                description="exchange rate IEW -> MW",
            ),
            Parameter("df_MW", -25.0, 40.0, "Hz", start=5.0, description="myelin water shift"),
            Parameter("df_AW", -25.0, 25.0, "Hz", start=-2.0, description="axonal water shift"),
            Parameter("f_bg", -500.0, 500.0, "Hz", start=0.0, description="background frequency"),
            Parameter("phi0", -2 * math.pi, 2 * math.pi, "rad", start=0.0, description="phase"),
        )
        self.parameters, self.fixed = _fixed_split(self.parameters, fixed)
        super().__init__(covariate_maps={"b1": b1}, flip_angles=fa, te=te_arr)

    # -- physics ---------------------------------------------------------------------------------
    def steady_state(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Complex steady state ``(V, n_fa, 2)`` of [IEW, MW] (pool sizes included)."""
        v = p["MWF"].shape[0]
        b1 = p["b1"] if "b1" in p else torch.ones_like(p["MWF"])
        s = self.fixed_settings
        if self.surrogate is None:
            return epgx_spgr(
                self.flip_angles,
                s["tr"],
                p["T1_IEW"],
                s["t2_iew"],
                s["t1_mw"],
                s["t2_mw"],
                p["MWF"],
                p["k_IEW"],
                b1=b1,
                spoil_increment=s["spoil_increment"],
                n_tr=self.n_tr,
                tol=1e-4,
                dtype=p["MWF"].dtype,
            )
        alpha = self.flip_angles[None, :] * b1  # (V, n_fa) effective flip angle, deg
        bm = spgr_two_pool_steady_state(
            self.flip_angles,
            s["tr"],
            p["T1_IEW"],
            s["t1_mw"],
            p["MWF"],
            p["k_IEW"],
            b1=b1,
            dtype=p["MWF"].dtype,
        )  # (V, n_fa, 2)

        def rep(x):
            return x.expand(v, self.n_fa).reshape(-1, 1)

        corr = self.surrogate(
            {
                "MWF": rep(p["MWF"]),
                "T1_IEW": rep(p["T1_IEW"]),
                "k_IEW": rep(p["k_IEW"]),
                "alpha": alpha.reshape(-1, 1),
            }
        ).reshape(v, self.n_fa, 4)
        re = bm + corr[..., 0::2]
        return torch.complex(re, corr[..., 1::2])

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        p = _with_fixed(p, self.fixed)
        ss = self.steady_state(p)  # (V, n_fa, 2)
        te = self.te  # (n_te,)
        w = _TWO_PI_MS * te
        zero = torch.zeros_like(w * p["S0"])
        d_mw = torch.exp(torch.complex(-te / p["T2s_MW"], w * p["df_MW"]))  # (V, n_te)
        d_aw = torch.exp(torch.complex(-te / p["T2s_AW"], w * p["df_AW"]))
        d_ew = torch.exp(torch.complex(-te / p["T2s_EW"], zero))
        fa_w = p["fAW"].to(d_aw.dtype)
        d_iew = fa_w * d_aw + (1 - fa_w) * d_ew
        sig = ss[:, :, 1:2] * d_mw[:, None, :] + ss[:, :, 0:1] * d_iew[:, None, :]
        bg = torch.exp(torch.complex(zero, w * p["f_bg"] + p["phi0"]))
        out = p["S0"][:, :, None] * sig * bg[:, None, :]
        return out.reshape(out.shape[0], self.n_fa * self.n_te)

    def initial_guess(self, data, inputs):
        if not data.is_complex():
            raise ModelError("McrMwi fits complex GRE data (magnitude and phase)")
        v = data.shape[0]
        z = data.reshape(v, self.n_fa, self.n_te)
        # background frequency and phase from the flip angle with the most signal
        best = z[:, :, 0].abs().argmax(dim=1)
        zb = z[torch.arange(v, device=z.device), best]
        f, ph = _phase_start(zb, self.te)
        # DESPOT1 on the first-echo magnitudes: S/sinα = E1·S/tanα + M0(1 − E1)
        b1 = inputs.get("b1", torch.ones((v, 1), dtype=self.te.dtype, device=self.te.device))
        a = torch.deg2rad(self.flip_angles)[None, :] * b1
        s = z[:, :, 0].abs()
        x, y = s / torch.tan(a), s / torch.sin(a)
        xm, ym = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
        e1 = ((x - xm) * (y - ym)).sum(1) / ((x - xm) ** 2).sum(1).clamp_min(1e-30)
        e1 = e1.clamp(0.5, 0.999)
        m0 = (ym[:, 0] - e1 * xm[:, 0]) / (1 - e1)
        t1 = (-self.fixed_settings["tr"] / torch.log(e1)).clamp(
            self.parameter("T1_IEW").lower, self.parameter("T1_IEW").upper
        )
        s0 = (m0 * math.exp(float(self.te[0]) / 40.0)).clamp_min(1e-12)
        full = torch.ones_like(s0)
        out = {
            "S0": s0,
            "MWF": 0.1 * full,
            "fAW": 0.6 * full,
            "T2s_MW": 10.0 * full,
            "T2s_AW": 64.0 * full,
            "T2s_EW": 48.0 * full,
            "T1_IEW": t1,
            "k_IEW": 2.0 * full,
            "df_MW": 5.0 * full,
            "df_AW": -2.0 * full,
            "f_bg": f.clamp(-499.0, 499.0),
            "phi0": ph,
        }
        return {k: v for k, v in out.items() if k not in self.fixed}

    def derived(self, p):
        p = _with_fixed(p, self.fixed)
        return {
            "AWF": ((1 - p["MWF"]) * p["fAW"]).reshape(-1),
            "EWF": ((1 - p["MWF"]) * (1 - p["fAW"])).reshape(-1),
        }
