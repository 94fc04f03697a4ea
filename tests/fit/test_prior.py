"""fit.Prior against closed forms: a one-parameter model S = θ with an L2 data loss in adam (the
Gaussian prior's weighted mean, the L1 prior's soft threshold), and conjugate / quadrature
posteriors in mcmc."""

import numpy as np
import pytest
import torch
from scipy import integrate

from qmrkit import fit
from qmrkit.errors import ParameterError, ShapeError
from qmrkit.fit.regularizers import RegularizerContext

M = 4  # measurements per voxel
LO, HI = -20.0, 20.0


def _const_model(n_meas=M):
    return fit.model_from_function(
        lambda theta, k: theta * torch.ones_like(k), {"theta": (LO, HI)}, k=np.arange(n_meas)
    )


def _adam(data, regs, device=None):
    return fit.adam(
        _const_model(data.shape[-1]),
        data,
        loss="l2",
        regularizers=regs,
        dtype=torch.float64,
        max_iter=20000,
        convergence_value=1e-9,
        min_lr_factor=1e-4,
        device=device,
        progress=False,
    )


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(1, 5, (n, 1)) + rng.normal(0, 0.5, (n, M))


def test_adam_gaussian_prior_closed_form(device):
    """loss = mean_m((θ − y_m)/s)² + λ((θ − μ)/σ)²  ⇒  θ* = (ȳ/s² + λμ/σ²)/(1/s² + λ/σ²), s the
    data scale adam divides by; σ a per-voxel map, μ a scalar, two λ."""
    y = _data(12)
    ybar = y.mean(1)
    sigma = np.linspace(0.5, 3.0, 12)
    mu = 2.0
    shifts = {}
    for lam in (0.05, 0.2):
        r = _adam(y, [fit.Prior("theta", mu, sigma, lam, kind="gaussian")], device)
        s = r.settings["data_scale"]
        ref = (ybar / s**2 + lam * mu / sigma**2) / (1 / s**2 + lam / sigma**2)
        got = r["theta"].cpu().numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref - ybar).max())
        shifts[lam] = (ybar - got) / (ybar - mu)  # fraction of the way toward μ
        # the fraction equals κ/(1 + κ) with κ = λs²/σ²: grows with λ and with 1/σ
        kappa = lam * s**2 / sigma**2
        np.testing.assert_allclose(shifts[lam], kappa / (1 + kappa), rtol=1e-5)
    assert np.all(shifts[0.2] > shifts[0.05])
    assert np.all(np.diff(shifts[0.05]) < 0)  # larger σ → smaller shift


def test_adam_l1_prior_soft_threshold_per_roi():
    """loss = mean_m((θ − y_m)/s)² + λ|θ − μ|/σ  ⇒  θ* = ȳ − sign(ȳ − μ)·min(|ȳ − μ|, λs²/(2σ)):
    the shift toward μ is exactly λs²/(2σ) until θ reaches μ. μ, σ per ROI from a label table."""
    n = 16
    y = _data(n, seed=1)
    ybar = y.mean(1)
    labels = np.arange(n) % 4  # label 0 has no entry: no prior there
    table = {1: (1.0, 2.0), 2: (2.5, 1.0), 3: (4.0, 0.25)}
    lam = 0.02
    r = _adam(y, [fit.Prior("theta", weight=lam, kind="l1", labels=labels, table=table)])
    s = r.settings["data_scale"]
    mu = np.array([table.get(k, (np.nan, np.nan))[0] for k in labels])
    sg = np.array([table.get(k, (np.nan, np.nan))[1] for k in labels])
    thr = lam * s**2 / (2 * sg)
    ref = np.where(labels == 0, ybar, ybar - np.sign(ybar - mu) * np.minimum(abs(ybar - mu), thr))
    got = r["theta"].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)
    # the cases covered: shrunk by exactly the threshold, and stopped at μ
    assert np.any((labels > 0) & (abs(ybar - mu) > 1.5 * thr))
    assert np.any((labels > 0) & (abs(ybar - mu) < 0.8 * thr))


def test_prior_penalty_values_and_maps():
    """penalty = weight · Σ_params Σ_fitted |z| (or z²) / n_fitted, with μ, σ maps per parameter."""
    rng = np.random.default_rng(4)
    shape = (3, 4)
    a, b = rng.normal(size=shape), rng.normal(size=shape)
    mu = {"a": rng.normal(size=shape), "b": 0.5}
    sg = {"a": rng.uniform(0.5, 2, shape), "b": 2.0}
    mask = rng.uniform(size=shape) > 0.3
    mask[0, 0] = True
    mu["a"][0, 0] = np.nan  # NaN: no prior on "a" at this voxel
    t = {"a": torch.tensor(a), "b": torch.tensor(b)}
    ctx = RegularizerContext(t, t, torch.tensor(mask), int(mask.sum()))
    za, zb = (a - mu["a"]) / sg["a"], (b - 0.5) / 2.0
    has_a = mask & np.isfinite(mu["a"])
    for kind, f in (("l1", np.abs), ("gaussian", np.square)):
        got = float(fit.Prior(("a", "b"), mu, sg, 3.0, kind=kind)(ctx))
        ref = 3.0 * (f(za)[has_a].sum() + f(zb)[mask].sum()) / mask.sum()
        np.testing.assert_allclose(got, ref, rtol=1e-13)


def _mcmc(y, prior, noise, device=None):
    return fit.mcmc(
        _const_model(y.shape[-1]),
        y,
        noise=noise,
        priors=[prior],
        n_steps=2000,
        dtype=torch.float64,
        seed=3,
        device=device,
        progress=False,
    )


def test_mcmc_gaussian_prior_conjugate_posterior(device):
    """y_m ~ N(θ, s²), θ ~ N(μ, σ²): posterior N((Σy/s² + μ/σ²)/(M/s² + 1/σ²), 1/(M/s² + 1/σ²)),
    μ and σ per voxel (maps); within 3.5 Monte Carlo standard errors."""
    n, s = 10, 0.8
    y = _data(n, seed=5)
    rng = np.random.default_rng(6)
    mu, sigma = rng.uniform(1, 5, n), rng.uniform(0.2, 1.0, n)
    r = _mcmc(y, fit.Prior("theta", mu, sigma, kind="gaussian"), s, device)
    prec = M / s**2 + 1 / sigma**2
    mean, sd = (y.sum(1) / s**2 + mu / sigma**2) / prec, 1 / np.sqrt(prec)
    m, st, ess = (
        r.mean["theta"].cpu().numpy(),
        r.std["theta"].cpu().numpy(),
        r.ess["theta"].cpu().numpy(),
    )
    assert np.all(np.abs(m - mean) <= 3.5 * sd / np.sqrt(ess)), (m - mean) / (sd / np.sqrt(ess))
    assert np.all(np.abs(st - sd) <= 3.5 * sd / np.sqrt(2 * ess))
    # without the prior the posterior mean is ȳ: the prior moved it toward μ
    assert np.all(np.abs(m - mu) < np.abs(y.mean(1) - mu))


def test_mcmc_laplace_prior_matches_quadrature():
    """ "l1" is a Laplace prior with scale σ: posterior mean and std against numerical quadrature
    of likelihood × Laplace density, per-ROI μ, σ from a table."""
    n, s = 6, 1.0
    y = _data(n, seed=7)
    labels = np.arange(n) % 2
    table = {0: (1.0, 0.3), 1: (4.0, 0.6)}
    r = _mcmc(y, fit.Prior("theta", kind="l1", labels=labels, table=table), s)
    for v in range(n):
        mu, b = table[labels[v]]

        def post(t, v=v, mu=mu, b=b):
            return np.exp(-0.5 * np.sum((y[v] - t) ** 2) / s**2 - abs(t - mu) / b)

        pts = [mu]
        z = integrate.quad(post, LO, HI, points=pts, limit=200)[0]
        m1 = integrate.quad(lambda t: t * post(t), LO, HI, points=pts, limit=200)[0] / z
        m2 = integrate.quad(lambda t: t * t * post(t), LO, HI, points=pts, limit=200)[0] / z
        sd = np.sqrt(m2 - m1**2)
        ess = float(r.ess["theta"][v])
        assert abs(float(r.mean["theta"][v]) - m1) <= 3.5 * sd / np.sqrt(ess)
        assert abs(float(r.std["theta"][v]) - sd) <= 3.5 * sd / np.sqrt(2 * ess)


def test_prior_bad_input():
    with pytest.raises(ParameterError, match="kind"):
        fit.Prior("a", 0.0, 1.0, kind="cauchy")
    with pytest.raises(ParameterError, match="sigma for 'a' must be finite and > 0"):
        fit.Prior("a", 0.0, 0.0)
    with pytest.raises(ParameterError, match="labels= and table= together"):
        fit.Prior("a", labels=np.zeros(3, int))
    with pytest.raises(ParameterError, match="mu and sigma"):
        fit.Prior("a")
    with pytest.raises(ParameterError, match=r"\(mu, sigma\)"):
        fit.Prior("a", labels=np.zeros(3, int), table={1: (1.0,)})
    y = _data(5)
    with pytest.raises(ShapeError, match=r"mu map for 'theta' has shape \(4,\)"):
        _adam(y, [fit.Prior("theta", np.zeros(4), 1.0)])
    with pytest.raises(ParameterError, match="unknown parameters"):
        fit.mcmc(_const_model(), y, noise=1.0, priors=[fit.Prior("T1", 1.0, 1.0)], n_steps=10)


def test_mcmc_callable_prior_still_accepted():
    """Plain log-prior callables keep working next to Prior objects: a N(μ, σ²) callable and a
    Prior(kind="gaussian") on one model give the conjugate posterior mean."""
    n, s, mu, sigma = 6, 0.8, 2.0, 0.4
    y = _data(n, seed=9)
    r = fit.mcmc(
        _const_model(),
        y,
        noise=s,
        priors=[
            lambda p: -0.5 * ((p["theta"][:, 0] - mu) / sigma) ** 2,
            fit.Prior("theta", mu, sigma, kind="gaussian"),
        ],
        n_steps=2000,
        dtype=torch.float64,
        seed=4,
        progress=False,
    )
    prec = M / s**2 + 2 / sigma**2  # the same prior twice: precision 2/σ²
    mean, sd = (y.sum(1) / s**2 + 2 * mu / sigma**2) / prec, 1 / np.sqrt(prec)
    m, ess = r.mean["theta"].numpy(), r.ess["theta"].numpy()
    assert np.all(np.abs(m - mean) <= 3.5 * sd / np.sqrt(ess))
