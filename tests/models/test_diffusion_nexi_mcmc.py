"""NEXI with fit.mcmc (ensemble and Metropolis–Hastings) against emcee."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmrkit import fit
from qmrkit.models.diffusion.nexi import NEXI, gauss_legendre_01

# GACELLE demo 1 protocol (paper 004, table S1): 15 b-values over Δ = 13, 21, 30 ms
B = np.array([2.3, 3.5, 4.8, 6.5] * 3 + [11.3, 11.3, 17.3])
DELTA = np.array([13] * 4 + [21] * 4 + [30] * 4 + [21, 30, 30.0])
NAMES = ("f", "Dn", "De", "rn", "p2")


def _numpy_nexi(p, b, t, n_nodes=40):
    """Independent float64 NumPy NEXI invariants for parameters ``p (n, 5)``: the textbook
    ``e^{−m}(cosh s − proj·sinh(s)/s)`` form of the 2×2 exponential, 40 Gauss–Legendre nodes."""
    xi, w = gauss_legendre_01(n_nodes)
    f, dn, de, rn, p2 = (p[:, j, None, None] for j in range(5))
    b, t, x = b[None, :, None], t[None, :, None], xi[None, None, :]
    re = rn * f / (1 - f)
    a, d = b * dn * x * x + rn * t, b * de + re * t
    m, hd = (a + d) / 2, (a - d) / 2
    s = np.sqrt(hd * hd + rn * t * re * t)
    proj = hd * (2 * f - 1) - 2 * rn * t * f
    sig = np.exp(-m) * (np.cosh(s) - proj * np.sinh(s) / s)
    k0, k2 = sig @ w, sig @ (w * 0.5 * (3 * xi * xi - 1))
    return np.stack([k0, -k2 * p[:, 4, None]], -1).reshape(len(p), -1)


@pytest.mark.slow  # ~10 s ours (both samplers), ~20 s emcee, on 2 cores
def test_mcmc_ensemble_and_mh_agree_with_emcee():
    """Two grey-matter voxels, known σ = 0.005 on the invariants (SNR 200: e.g. SNR 50 per
    image averaged over 16 directions; at SNR 50 on the invariants the posteriors pile up on
    the bounds and a 15 % comparison of stds would need far longer chains), flat priors on the
    bounds. Reference: emcee (64 walkers × 2500 steps, 20 % burn-in) on an independent NumPy
    model. Asserted for the ensemble (64 walkers × 2500 steps) and MH (32 chains × 5000 steps),
    float64, every parameter: effective sample size >= 1000 for both samplers and emcee, so
    that the Monte Carlo error of a mean difference is <= 0.045 σ and of a std ratio <= 3.2 %;
    then |mean − mean_emcee| <= 0.15 σ_emcee and |σ/σ_emcee − 1| <= 0.10, i.e. more than four
    Monte Carlo standard errors of room (measured: <= 0.06 σ and <= 3.5 %)."""
    emcee = pytest.importorskip("emcee")
    sigma = 0.005
    model = NEXI(B, DELTA, orders=(0, 2))
    truth = {
        "f": np.array([0.35, 0.5]),
        "Dn": np.array([2.2, 2.5]),
        "De": np.array([0.8, 1.1]),
        "rn": np.array([0.65 / 25, 0.5 / 12]),
        "p2": np.array([0.3, 0.45]),
    }
    rng = np.random.default_rng(12)
    y = model.simulate(truth).numpy() + rng.normal(0, sigma, (2, 30))
    tv = np.stack([truth[k] for k in NAMES], 1)
    np.testing.assert_allclose(_numpy_nexi(tv, B, DELTA), model.simulate(truth).numpy(), rtol=1e-9)
    lo = np.array([p.lower for p in model.parameters])
    hi = np.array([p.upper for p in model.parameters])

    def logp(p, v):
        out = np.full(len(p), -np.inf)
        ok = np.all((p > lo) & (p < hi), axis=1)
        if ok.any():
            r = _numpy_nexi(p[ok], B, DELTA) - y[v]
            out[ok] = -0.5 * (r * r).sum(1) / sigma**2
        return out

    ens = fit.mcmc(
        model,
        y,
        method="ensemble",
        noise=sigma,
        n_walkers=64,
        n_steps=2500,
        burnin=0.2,
        dtype=torch.float64,
        seed=1,
    )
    mh = fit.mcmc(
        model,
        y,
        method="mh",
        noise=sigma,
        n_walkers=32,
        n_steps=5000,
        burnin=0.2,
        dtype=torch.float64,
        seed=2,
    )
    for v in range(2):
        x0 = np.array([ens.median[k][v].item() for k in NAMES])
        r = np.random.default_rng(v)
        p0 = np.clip(x0 + 1e-3 * np.abs(x0) * r.standard_normal((64, 5)), lo + 1e-9, hi - 1e-9)
        sampler = emcee.EnsembleSampler(64, 5, logp, args=(v,), vectorize=True)
        sampler.random_state = np.random.mtrand.RandomState(100 + v).get_state()
        sampler.run_mcmc(p0, 2500)
        chain = sampler.get_chain(discard=500).reshape(-1, 5)
        ess_ref = chain.shape[0] / sampler.get_autocorr_time(discard=500, quiet=True)
        mean_ref, sd_ref = chain.mean(0), chain.std(0, ddof=1)
        assert ess_ref.min() >= 1000, ess_ref
        for res in (ens, mh):
            for j, k in enumerate(NAMES):
                m, sd, ess = (res.mean[k][v].item(), res.std[k][v].item(), res.ess[k][v].item())
                assert ess >= 1000, (res.method, v, k, ess)
                assert abs(m - mean_ref[j]) <= 0.15 * sd_ref[j], (res.method, v, k)
                assert abs(sd / sd_ref[j] - 1) <= 0.10, (res.method, v, k, sd / sd_ref[j])
