"""Spherical-mean compartments and AxCaliberSMT against scipy quad over cos θ (float64), with the
restricted cylinder from an independent NumPy Van Gelderen series; recovery by fit.lm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from qmrkit import fit, models
from qmrkit.errors import (
    BoundsError,
    ConvergenceWarning,
    ParameterError,
    ShapeError,
    UnitsWarning,
)
from qmrkit.models.diffusion import (
    AxCaliberSMT,
    Invariants,
    axisymmetric_spherical_mean,
    stick_spherical_mean,
)

from .test_diffusion_restricted import ref_deff

# Fan et al. 2020 (MGH Connectom, 300 mT/m): δ = 8 ms, Δ = 19 and 49 ms, 8 shells each; the same
# 16 b-values as GACELLE's AxCaliberSMT demo (paper 004, table S1), b up to 17.8 ms/µm²
B = np.array(
    [0.05, 0.35, 0.8, 1.5, 2.4, 3.45, 4.75, 6.0, 0.2, 0.95, 2.3, 4.25, 6.75, 9.85, 13.5, 17.8]
)
BIG_DELTA = np.array([19.0] * 8 + [49.0] * 8)
SMALL_DELTA = 8.0
NAMES = ("a", "f", "fcsf", "DeR")


def quad_mean(b, d_par, d_perp):
    """∫₀¹ exp(−b·D⊥ − b·(D∥ − D⊥)·ξ²) dξ by adaptive quadrature."""
    return quad(
        lambda x: np.exp(-b * d_perp - b * (d_par - d_perp) * x * x), 0, 1, epsabs=0, epsrel=1e-13
    )[0]


def test_axisymmetric_mean_equals_quad_every_branch():
    cases = [
        (17.8, 1.7, 0.2),  # erf branch, large x
        (1.0, 1.7, 1.7),  # x = 0: series
        (0.05, 1.7, 1.0),  # x = 0.035: series
        (0.2, 1.0, 1.2),  # x = −0.04: series, oblate
        (6.0, 0.5, 2.5),  # x = −12: quadrature branch
        (17.8, 0.1, 3.0),  # x = −52
        (2.0, 3.0, 0.0),  # stick
    ]
    b = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    dpar = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    dperp = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    got = axisymmetric_spherical_mean(b, dpar, dperp).numpy()
    ref = [quad_mean(*c) for c in cases]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose(
        stick_spherical_mean(b, dpar).numpy(),
        [quad_mean(bb, d, 0) for bb, d, _ in cases],
        rtol=1e-12,
    )
    # float32
    got32 = axisymmetric_spherical_mean(b.float(), dpar.float(), dperp.float()).numpy()
    np.testing.assert_allclose(got32, ref, rtol=2e-6)


def test_axisymmetric_mean_gradient_finite_at_isotropy():
    """D∥ = D⊥ (x = 0, where the erf form has √x): derivatives finite and equal to the exact
    ∂/∂D∥ ∫ e^{−bD⊥ − b(D∥−D⊥)ξ²} dξ = −b·e^{−bD}/3 and ∂/∂D⊥ = −b·e^{−bD}·2/3."""
    b, d = 2.0, 1.3
    dpar = torch.tensor(d, dtype=torch.float64, requires_grad=True)
    dperp = torch.tensor(d, dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(axisymmetric_spherical_mean(b, dpar, dperp), (dpar, dperp))
    e = np.exp(-b * d)
    np.testing.assert_allclose([float(g[0]), float(g[1])], [-b * e / 3, -2 * b * e / 3], rtol=1e-12)


def reference_signal(a, f, fcsf, der, da=1.7, dcsf=3.0, d0=None):
    """AxCaliberSMT per shell: quad over cos θ of the directional signals, with the cylinder's
    perpendicular D_eff from the NumPy Van Gelderen series (test_diffusion_restricted)."""
    out = []
    for b, bd in zip(B, BIG_DELTA, strict=True):
        deff = ref_deff("cylinder", a / 2, da if d0 is None else d0, SMALL_DELTA, bd)
        sr = quad(
            lambda x, b=b, deff=deff: np.exp(-b * (da * x * x + deff * (1 - x * x))),
            0,
            1,
            epsrel=1e-13,
        )[0]
        sh = quad(lambda x, b=b: np.exp(-b * (da * x * x + der * (1 - x * x))), 0, 1, epsrel=1e-13)[
            0
        ]
        out.append((1 - fcsf) * (f * sr + (1 - f) * sh) + fcsf * np.exp(-b * dcsf))
    return np.array(out)


def test_signal_equals_quad_reference():
    model = AxCaliberSMT(B, SMALL_DELTA, BIG_DELTA)
    rng = np.random.default_rng(0)
    for _ in range(4):
        vals = [rng.uniform(0.1, 20), rng.uniform(0, 1), rng.uniform(0, 0.5)]
        vals.append(rng.uniform(0.01, 1.7))
        p = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in zip(NAMES, vals, strict=True)}
        np.testing.assert_allclose(
            model.forward(p)[0].numpy(), reference_signal(*vals), rtol=1e-9
        )  # measured ≈ 1e-13
    # D0 > Da: wide cylinders become oblate (D_eff > D_a), the quadrature branch
    wide = AxCaliberSMT(B, SMALL_DELTA, BIG_DELTA, D0=3.0, diameter_bounds=(0.1, 40.0))
    assert wide._oblate_r
    vals = [38.0, 0.7, 0.1, 0.5]
    p = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in zip(NAMES, vals, strict=True)}
    np.testing.assert_allclose(
        wide.forward(p)[0].numpy(), reference_signal(*vals, d0=3.0), rtol=1e-9
    )
    # derived maps are the physical fractions
    d = model.derived({"f": torch.tensor([[0.6]]), "fcsf": torch.tensor([[0.25]])})
    np.testing.assert_allclose([float(d["fr"]), float(d["fh"])], [0.45, 0.3])


def _truth(n, seed):
    rng = np.random.default_rng(seed)
    return {
        "a": rng.uniform(1.0, 12.0, n),
        "f": rng.uniform(0.3, 0.9, n),
        "fcsf": rng.uniform(0.0, 0.3, n),
        "DeR": rng.uniform(0.2, 1.4, n),
    }


def test_recovery_noise_free_lm():
    truth = _truth(16, 1)
    model = AxCaliberSMT(B, SMALL_DELTA, BIG_DELTA)
    data = model.simulate(truth).numpy()
    res = fit.lm(model, data, dtype=torch.float64, progress=False)
    for k in NAMES:
        np.testing.assert_allclose(res[k].numpy(), truth[k], rtol=1e-6)  # measured ≤ 1e-10
    np.testing.assert_allclose(res["fr"].numpy(), truth["f"] * (1 - truth["fcsf"]), rtol=1e-6)
    # float32: the data and model rounded to 7 digits; a is least determined at small diameters
    res32 = fit.lm(model, data.astype(np.float32), dtype=torch.float32, progress=False)
    err = {k: np.abs(res32[k].numpy() / truth[k] - 1).max() for k in ("a", "f", "DeR")}
    err["fcsf"] = np.abs(res32["fcsf"].numpy() - truth["fcsf"]).max()
    print("float32 errors", err)
    # measured: a 1.7e-4, f 5e-7, DeR 3e-6 relative; fcsf 4e-7 absolute
    assert err["a"] < 1e-3 and err["f"] < 1e-5 and err["DeR"] < 1e-5 and err["fcsf"] < 1e-5, err


def test_adam_and_mcmc_run_on_the_model():
    """The model is an ordinary fit.Model: adam and the ensemble sampler take it unchanged (short
    runs; the posterior of noise-free data centres on the truth)."""
    truth = {
        "a": np.array([6.0, 9.0]),
        "f": np.array([0.6, 0.7]),
        "fcsf": np.array([0.1, 0.05]),
        "DeR": np.array([0.6, 0.9]),
    }
    model = AxCaliberSMT(B, SMALL_DELTA, BIG_DELTA)
    data = model.simulate(truth).numpy()
    with pytest.warns(ConvergenceWarning):  # 200 iterations: a smoke run, not a converged fit
        res = fit.adam(model, data, max_iter=200, progress=False)
    for k in NAMES:
        assert np.isfinite(res[k].numpy()).all()
    assert res.loss_history[-1] < res.loss_history[0]
    noisy = data + np.random.default_rng(0).normal(0, 0.005, data.shape)
    mc = fit.mcmc(model, noisy, n_steps=300, n_walkers=16, noise=0.005, progress=False, seed=1)
    for k in NAMES:
        m, s = mc.mean[k].numpy(), mc.std[k].numpy()
        assert np.all(s > 0) and np.all(np.abs(m - truth[k]) < 4 * s), (k, m, s)


def test_from_invariants_and_registry():
    inv = Invariants(
        values=np.zeros((2, 16, 1)),
        orders=(0,),
        b=B,
        small_delta=np.full(16, SMALL_DELTA),
        big_delta=BIG_DELTA,
        mean_b0=np.ones(2),
    )
    m = AxCaliberSMT.from_invariants(inv, Da=2.0)
    np.testing.assert_array_equal(m.b.numpy(), B)
    assert m.Da == 2.0 and m.DeL == 2.0 and m.parameter("DeR").upper == 2.0
    inv_no_delta = Invariants(
        values=np.zeros((16, 1)),
        orders=(0,),
        b=B,
        small_delta=np.full(16, np.nan),
        big_delta=BIG_DELTA,
        mean_b0=np.ones(1),
    )
    with pytest.raises(ShapeError, match="δ"):
        AxCaliberSMT.from_invariants(inv_no_delta)
    m2 = models.registry.get("AxCaliber-SMT", b=B, small_delta=SMALL_DELTA, big_delta=BIG_DELTA)
    assert isinstance(m2, AxCaliberSMT) and m2.n_measurements == 16
    assert "axcalibersmt" in models.available(diffusion=True)


def test_bad_inputs():
    with pytest.raises(ParameterError, match="b must"):
        AxCaliberSMT([-1.0, 2.0], 8.0, 19.0)
    with pytest.raises(ShapeError, match="one value per shell"):
        AxCaliberSMT(B, 8.0, [19.0, 49.0])
    with pytest.raises(ParameterError, match="big_delta"):
        AxCaliberSMT(B, 8.0, 5.0)
    with pytest.raises(ParameterError, match="Da"):
        AxCaliberSMT(B, 8.0, BIG_DELTA, Da=0.0)
    with pytest.raises(ParameterError, match="diameter_bounds"):
        AxCaliberSMT(B, 8.0, BIG_DELTA, diameter_bounds=(-1.0, 20.0))
    good = {"a": [5.0], "f": [0.5], "fcsf": [0.1], "DeR": [0.5]}
    with pytest.raises(BoundsError, match="fcsf must lie in"):
        AxCaliberSMT(B, 8.0, BIG_DELTA).simulate({**good, "fcsf": [-0.1]})
    with pytest.raises(BoundsError, match="a must lie in"):
        AxCaliberSMT(B, 8.0, BIG_DELTA).simulate({**good, "a": [-1.0]})
    with pytest.raises(ShapeError, match="measurements"):
        fit.lm(AxCaliberSMT(B, 8.0, BIG_DELTA), np.ones((3, 15)), progress=False)


def test_unit_slips_warn():
    with pytest.warns(UnitsWarning, match="look like s/mm²"):
        AxCaliberSMT(B * 1000, SMALL_DELTA, BIG_DELTA)
    with pytest.warns(UnitsWarning, match="look like seconds"):
        AxCaliberSMT(B, SMALL_DELTA / 1000, BIG_DELTA / 1000)
