"""Batched Levenberg–Marquardt against scipy.optimize.least_squares and against ground truth."""

import numpy as np
import pytest
import torch

from qmrkit import fit, models
from qmrkit.sim import MOLLI_TI, add_noise

from .helpers import (
    maps_array,
    np_ir,
    np_molli,
    np_r2star,
    np_t2,
    np_t2_offset,
    np_vfa,
    qmrkit_start,
    scipy_fit,
)

TI = np.array(MOLLI_TI)
IR_TI = np.array([50.0, 150, 300, 600, 1200, 2400, 4800])
FA = np.array([2.0, 5, 10, 15, 20])
TR = 15.0
TE = np.array([5.0, 10, 20, 35, 55, 80])
V = 120


def _molli_case():
    rng = np.random.default_rng(100)  # own seed: data independent of test order
    t1s = rng.uniform(300, 1700, V)
    a = rng.uniform(500, 1000, V)
    b = a * rng.uniform(1.9, 2.2, V)
    clean = np.stack([np_molli(p, TI) for p in zip(a, b, t1s, strict=True)])
    model = models.MolliT1(TI)
    return model, add_noise(clean, 15.0, seed=1), (lambda p: np_molli(p, TI)), ["A", "B", "T1star"]


def _ir_case():
    rng = np.random.default_rng(101)  # own seed: data independent of test order
    t1 = rng.uniform(300, 2000, V)
    m0 = rng.uniform(500, 1000, V)
    eta = rng.uniform(0.85, 1.0, V)
    clean = np.stack([np_ir(p, IR_TI) for p in zip(m0, t1, eta, strict=True)])
    return (
        models.InversionRecovery(IR_TI),
        add_noise(clean, 10.0, seed=2),
        (lambda p: np_ir(p, IR_TI)),
        ["M0", "T1", "eta"],
    )


def _vfa_case():
    rng = np.random.default_rng(102)  # own seed: data independent of test order
    t1 = rng.uniform(400, 2500, V)
    m0 = rng.uniform(2000, 4000, V)
    b1 = rng.uniform(0.7, 1.3, V)
    clean = np.stack(
        [np_vfa(p, FA, TR, b) for p, b in zip(zip(m0, t1, strict=True), b1, strict=True)]
    )
    data = add_noise(clean, 2.0, kind="gaussian", seed=3)
    model = models.VfaT1(FA, TR, b1=b1)
    funs = [lambda p, b=b: np_vfa(p, FA, TR, b) for b in b1]
    return model, data, funs, ["M0", "T1"]


def _t2_case():
    rng = np.random.default_rng(103)  # own seed: data independent of test order
    t2 = rng.uniform(20, 150, V)
    s0 = rng.uniform(500, 1000, V)
    clean = np.stack([np_t2(p, TE) for p in zip(s0, t2, strict=True)])
    return (
        models.MonoExp(TE, kind="T2"),
        add_noise(clean, 10.0, kind="gaussian", seed=4),
        (lambda p: np_t2(p, TE)),
        ["S0", "T2"],
    )


def _r2star_case():
    rng = np.random.default_rng(104)  # own seed: data independent of test order
    r2s = rng.uniform(10, 80, V)
    s0 = rng.uniform(500, 1000, V)
    clean = np.stack([np_r2star(p, TE) for p in zip(s0, r2s, strict=True)])
    return (
        models.MonoExp(TE, kind="R2star"),
        add_noise(clean, 10.0, kind="gaussian", seed=5),
        (lambda p: np_r2star(p, TE)),
        ["S0", "R2star"],
    )


def _t2_offset_case():
    rng = np.random.default_rng(105)  # own seed: data independent of test order
    t2 = rng.uniform(20, 60, V)
    s0 = rng.uniform(500, 1000, V)
    c = rng.uniform(50, 100, V)
    clean = np.stack([np_t2_offset(p, TE) for p in zip(s0, t2, c, strict=True)])
    return (
        models.MonoExp(TE, kind="T2", offset=True),
        add_noise(clean, 5.0, kind="gaussian", seed=6),
        (lambda p: np_t2_offset(p, TE)),
        ["S0", "T2", "C"],
    )


CASES = {
    "molli": _molli_case,
    "ir": _ir_case,
    "vfa": _vfa_case,
    "t2": _t2_case,
    "r2star": _r2star_case,
    "t2_offset": _t2_offset_case,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lm_matches_scipy_least_squares(name):
    """Same model, same data, same start: per-voxel agreement to 1e-4 relative (float64)."""
    model, data, fun, names = CASES[name]()
    result = fit.lm(model, data, dtype=torch.float64, ftol=1e-12, xtol=1e-12)
    ours = maps_array(result, names)
    starts, scale = qmrkit_start(model, data)
    lo = [p.lower * (scale if p.amplitude else 1) for p in model.parameters]
    hi = [p.upper * (scale if p.amplitude else 1) for p in model.parameters]
    if isinstance(fun, list):  # per-voxel inputs (B1): one function per voxel
        ref = np.stack(
            [
                scipy_fit(f, data[v : v + 1], starts[v : v + 1], (lo, hi))[0]
                for v, f in enumerate(fun)
            ]
        )
    else:
        ref = scipy_fit(fun, data, starts, (lo, hi))
    # relative difference; amplitudes that sit on a bound (e.g. an offset of 0) are compared with a
    # floor of 1e-6 of the data scale instead of dividing by (almost) zero
    floor = np.array([1e-6 * scale if p.amplitude else 0.0 for p in model.parameters])
    rel = np.abs(ours - ref) / (np.abs(ref) + floor)
    assert result.converged.all()
    assert rel.max() <= 1e-4, (
        f"max relative difference {rel.max():.2e} at voxel {np.unravel_index(rel.argmax(), rel.shape)}"
    )


@pytest.mark.parametrize("name", ["molli", "vfa", "t2"])
def test_lm_float32_matches_float64(name, device):
    """The default float32 path lands on the float64 solution (normal equations solved in float64)."""
    model, data, _, names = CASES[name]()
    r64 = fit.lm(model, data, dtype=torch.float64, ftol=1e-12, xtol=1e-12)
    r32 = fit.lm(model, data, device=device)
    rel = np.abs(maps_array(r32, names) - maps_array(r64, names)) / np.abs(maps_array(r64, names))
    assert np.median(rel) < 1e-5
    assert rel.max() < 2e-3


def test_lm_molli_t1_error_no_worse_than_scipy():
    """Known truth, realistic noise (SNR 50): qmrkit's T1 error is no worse than scipy's."""
    from qmrkit.sim import molli_series

    t1 = np.random.default_rng(7).uniform(400, 2000, 300)
    series, truth = molli_series(t1, 1000.0, TI, snr=50, seed=7)
    model = models.MolliT1(TI)
    res = fit.lm(model, series)
    ours = np.abs(res["T1"].numpy() - t1) / t1
    starts, scale = qmrkit_start(model, series)
    ref = scipy_fit(
        lambda p: np_molli(p, TI), series, starts, ([0, 0, 1], [10 * scale, 30 * scale, 6000])
    )
    t1_ref = ref[:, 2] * (ref[:, 1] / ref[:, 0] - 1)
    theirs = np.abs(t1_ref - t1) / t1
    assert np.median(ours) <= np.median(theirs) * 1.001
    assert np.percentile(ours, 95) <= np.percentile(theirs, 95) * 1.001
    assert np.median(ours) < 0.03  # and it is accurate in absolute terms at SNR 50


def test_lm_noiseless_exact(device):
    """Noiseless data: the Look-Locker corrected T1 equals the truth."""
    from qmrkit.sim import molli_series

    t1 = np.linspace(300, 2500, 64).reshape(8, 8)
    series, _ = molli_series(t1, 800.0, TI, snr=None)
    res = fit.lm(models.MolliT1(TI), series, dtype=torch.float64, device=device)
    np.testing.assert_allclose(res["T1"].cpu().numpy(), t1, rtol=1e-7)
    assert res.converged.all()


def test_lm_mask_weights_chunks_and_nonfinite():
    model, data, _, names = CASES["t2"]()
    data = data.reshape(10, 12, -1).copy()
    mask = np.ones((10, 12), bool)
    mask[0] = False
    data[5, 5, 2] = np.nan
    with pytest.warns(Warning, match="1 voxel"):
        res = fit.lm(model, data, mask=mask, batch_size=17)
    assert torch.isnan(res["T2"][0]).all() and torch.isnan(res["T2"][5, 5])
    assert int(res.mask.sum()) == mask.sum() - 1
    full = fit.lm(model, data.reshape(-1, data.shape[-1])[12:], batch_size=1000)
    # chunking does not change the answer (voxel 5*12+5 is excluded in both)
    a = res["T2"].reshape(-1)[12:].numpy()
    b = full["T2"].numpy()
    ok = np.isfinite(a)
    np.testing.assert_allclose(a[ok], b[ok], rtol=1e-5)
    # weights of 2 everywhere leave the least-squares solution unchanged
    w = fit.lm(model, data, mask=mask, weights=np.full(mask.shape, 2.0))
    np.testing.assert_allclose(
        w["T2"][mask & np.isfinite(res["T2"].numpy())],
        res["T2"][mask & np.isfinite(res["T2"].numpy())],
        rtol=1e-4,
    )


def test_lm_converges_in_tens_of_iterations():
    model, data, _, _ = CASES["molli"]()
    res = fit.lm(model, data)
    its = res.iterations.numpy()
    assert np.median(its) <= 10 and its.max() <= 50
    assert res.loss_history[-1] <= res.loss_history[0]


def test_lm_float32_voxels_stop_at_their_rounding_floor():
    """VFA (M0 and T1 strongly correlated) in float32: near the optimum a step's predicted gain
    falls below the cost's rounding floor, and accepting such steps only moves the voxel by
    rounding. Those voxels must end there (before the fix the slowest of these 2048 took 21
    iterations, the float64 cost reached being the same), and stopping must not cost accuracy:
    every voxel's cost, evaluated in float64, is within 2e-4 of the float64 optimum's."""
    tr, fa = 15.0, np.array([2.0, 5.0, 10.0, 15.0, 20.0])
    rng = np.random.default_rng(0)
    t1 = rng.uniform(300, 2000, 2048)
    e1 = np.exp(-tr / t1)[:, None]
    a = np.deg2rad(fa)
    clean = 1000.0 * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1)
    data = add_noise(clean, 2.0, kind="rician", seed=1)
    model = models.VfaT1(fa, tr)
    r32 = fit.lm(model, data, progress=False)
    r64 = fit.lm(model, data, dtype=torch.float64, ftol=1e-12, xtol=1e-12, progress=False)
    model64 = models.VfaT1(fa, tr).to(dtype=torch.float64)

    def cost(res):
        p = {k: torch.as_tensor(res[k].numpy(), dtype=torch.float64)[:, None] for k in ("M0", "T1")}
        return 0.5 * ((model64.forward(p).numpy() - data) ** 2).sum(1)

    excess = (cost(r32) - cost(r64)) / cost(r64)
    assert r32.converged.all()
    assert excess.max() <= 2e-4, excess.max()
    assert r32.iterations.numpy().max() <= 12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lm_step_cut_by_bounds_is_not_convergence(dtype):
    """Correlated columns: the first step overshoots q's upper bound, and the projected step
    raises the cost (its predicted gain is negative). That must not stop the voxel at its start:
    the answer is the box-constrained least-squares solution (scipy lsq_linear)."""
    from scipy.optimize import lsq_linear

    t = np.linspace(1.0, 2.4, 8)
    model = fit.model_from_function(
        lambda p, q, t: p + q * t, {"p": (-10.0, 10.0), "q": (0.0, 0.5)}, t=t
    )
    y = -0.4 + 0.9 * t  # truth q = 0.9 is outside the box
    ref = lsq_linear(np.stack([np.ones_like(t), t], 1), y, bounds=([-10, 0], [10, 0.5]))
    res = fit.lm(model, y[None], init={"p": 0.9, "q": 0.25}, dtype=dtype, progress=False)
    tol = 1e-8 if dtype == torch.float64 else 2e-4
    # before the fix: stopped after one iteration at the start (p, q) = (0.9, 0.25)
    np.testing.assert_allclose(res["p"].numpy(), [ref.x[0]], atol=tol)
    np.testing.assert_allclose(res["q"].numpy(), [ref.x[1]], atol=tol)
