"""Independent NumPy forward models and a scipy reference fitter for the fitting tests."""

from __future__ import annotations

import numpy as np
import scipy.optimize as so
import torch

from qmrkit.fit.problem import make_problem
from qmrkit.fit.starts import initial_theta


def np_molli(p, ti):
    return np.abs(p[0] - p[1] * np.exp(-ti / p[2]))


def np_ir(p, ti):
    return np.abs(p[0] * (1 - (1 + p[2]) * np.exp(-ti / p[1])))


def np_vfa(p, fa_deg, tr, b1=1.0):
    a = np.deg2rad(fa_deg) * b1
    e1 = np.exp(-tr / p[1])
    return p[0] * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1)


def np_t2(p, te):
    return p[0] * np.exp(-te / p[1])


def np_r2star(p, te):
    return p[0] * np.exp(-te * p[1] / 1000)


def np_t2_offset(p, te):
    return p[0] * np.exp(-te / p[1]) + p[2]


def qmrkit_start(model, data, dtype=torch.float64):
    """The start qmrkit's solvers use, in physical units, as (V, P) NumPy."""
    problem = make_problem(model, data, dtype=dtype)
    theta, _ = initial_theta(problem)
    phys = problem.to_physical(theta)
    return np.stack([phys[n].cpu().numpy() for n in model.parameter_names], axis=1), problem.scale


def scipy_fit(fun, data, starts, bounds):
    """Per-voxel scipy.optimize.least_squares (trf, tight tolerances) from given starts."""
    out = np.empty_like(starts)
    for v in range(data.shape[0]):
        res = so.least_squares(
            lambda p, y=data[v]: fun(p) - y,
            starts[v],
            bounds=bounds,
            method="trf",
            x_scale="jac",
            ftol=1e-15,
            xtol=1e-15,
            gtol=1e-15,
            max_nfev=2000,
        )
        out[v] = res.x
    return out


def maps_array(result, names):
    return np.stack([result[n].reshape(-1).cpu().numpy().astype(np.float64) for n in names], axis=1)


def molli_series(n: int = 64, seed: int = 0, sigma: float = 20.0):
    """A MOLLI model and ``n`` noisy voxels ``(n, 8)``: T1 uniform in 300–2000 ms, T1*/T1 in
    0.8–0.9, A = 1000·T1*/T1 (B from the Look–Locker relation), Rician noise σ; also the true T1."""
    from qmrkit import models
    from qmrkit.sim import MOLLI_TI, add_noise

    rng = np.random.default_rng(seed)
    ti = np.asarray(MOLLI_TI)
    t1 = rng.uniform(300, 2000, n)
    ratio = rng.uniform(0.8, 0.9, n)
    a = 1000.0 * ratio
    b = a * (1 + 1 / ratio)
    clean = a[:, None] - b[:, None] * np.exp(-ti / (ratio * t1)[:, None])
    return models.MolliT1(ti), add_noise(clean, sigma, kind="rician", seed=seed + 1), t1


def adam_problem_and_u(model, data, dtype=torch.float64, weights=None):
    """``fit.adam``'s problem, its sigmoid map and the unconstrained start ``u0`` (V, P)."""
    import importlib

    adam_mod = importlib.import_module("qmrkit.fit.adam")
    problem = make_problem(
        model, data, weights=weights, dtype=dtype, need_finite_bounds=True, solver="adam"
    )
    theta0, _ = adam_mod.initial_theta(problem, None, start="auto", n_atoms=500, seed=0)
    mapping = adam_mod._Sigmoid(problem)
    return problem, mapping, mapping.inverse(theta0).detach()


def assert_fused_adam_follows_torch(grad_fn, u0, layout=lambda u: u, steps=50):
    """Run ``fit.adam``'s fused update for ``steps`` steps on ``grad_fn`` from ``u0`` (perturbed
    so that the steps travel, a learning-rate change at step 30 as the plateau rule makes) beside
    ``torch.optim.Adam``; each step's parameters must agree to 1e-6 relative. ``layout`` gives the
    fused state's storage (e.g. parameter-major); returns the final ``u``."""
    import importlib

    adam_mod = importlib.import_module("qmrkit.fit.adam")
    gen = torch.Generator().manual_seed(0)
    u0 = u0 + 0.5 * torch.randn(u0.shape, generator=gen, dtype=u0.dtype)
    u_ref = u0.clone().requires_grad_(True)
    opt = torch.optim.Adam([u_ref], lr=0.05)
    u = layout(u0.clone())
    fused = adam_mod._FusedAdam(u, 0.05)
    assert fused.exp_avg.stride() == u.stride()
    for step in range(steps):
        if step == 30:
            opt.param_groups[0]["lr"] = fused.lr = 0.025
        _, g_ref = grad_fn(layout(u_ref.detach()))
        u_ref.grad = g_ref.clone()
        opt.step()
        _, g = grad_fn(u)
        fused.step(u, g)
        rel = float(((u - u_ref.detach()).abs() / u_ref.detach().abs().clamp_min(1e-3)).max())
        assert rel < 1e-6, (step, rel)
    # the trajectory really moved (a no-op update would also "agree")
    assert float((u - u0).abs().max()) > 0.1
    return u


def start_away_from_optimum(model, data, factor: float = 1.2) -> dict:
    """Starting maps for engine comparisons: the closed-form start (which sits at the
    least-squares optimum) with every parameter moved by ``factor`` (amplitudes by 1/factor),
    kept inside the bounds. From the optimum itself an optimiser's steps follow gradients of
    rounding size, and two correct engines part ways on float64 rounding alone. (The L1 fit of
    ``test_adam_vjp_models``' T2 data is chaotic at rounding level from starts moved by 1.25–1.5,
    measured: its own sensitivity to a 1e-15 change of the data reached 1.5e-6–9e-6.)"""
    from qmrkit import fit

    start = fit.lm(model, data, dtype=torch.float64, max_iter=1, progress=False)
    init = {}
    for p in model.parameters:
        value = np.asarray(start[p.name], dtype=np.float64)
        moved = value / factor if p.amplitude else value * factor
        init[p.name] = moved if p.amplitude else np.clip(moved, p.lower, 0.95 * p.upper)
    return init


def fit_through_both_adam_engines(model, ref_model, data, loss, monkeypatch):
    """``fit.adam`` (float64, default rules, from :func:`start_away_from_optimum`) of ``data`` by
    ``model`` through its ``vjp_by_measurement`` hook and by ``ref_model`` (the same model
    without the hook) through the ``(V, P)`` engine. Asserts which engine ran which fit, equal iteration counts, and frozen
    counts within 6 voxels: freezing is an exact test ("the voxel's minimum did not decrease at
    all over a window") and a voxel on a flat plateau flips either way on float64 rounding
    differences between the engines (seen: 59 against 61 of 300 after a 1e-15 change in the
    start). Returns both results for the caller's value comparisons."""
    import importlib

    from qmrkit import fit

    adam_mod = importlib.import_module("qmrkit.fit.adam")
    kw = dict(loss=loss, dtype=torch.float64, progress=False)
    kw["init"] = start_away_from_optimum(model, data)
    calls = []
    engine = adam_mod._MeasurementMajorGradient.__call__
    monkeypatch.setattr(
        adam_mod._MeasurementMajorGradient,
        "__call__",
        lambda self, u: calls.append(1) or engine(self, u),
    )
    new = fit.adam(model, data, **kw)
    n_new = len(calls)
    ref = fit.adam(ref_model, data, **kw)
    assert n_new > new.iterations and len(calls) == n_new  # which engine ran which fit
    assert new.iterations == ref.iterations
    assert abs(new.settings["n_frozen"] - ref.settings["n_frozen"]) <= 6
    if loss == "l2":
        assert new.settings["n_frozen"] > 0  # the active set shrank in both
    return new, ref
