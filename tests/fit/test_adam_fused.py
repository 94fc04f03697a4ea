"""fit.adam's fused engine: the in-place Adam update against torch.optim.Adam, the closed-form
gradient against autograd, and the shrinking active set against a full run."""

import importlib

import numpy as np
import pytest
import torch

from qmrkit import fit, models
from qmrkit.sim import add_noise

from .helpers import (
    adam_problem_and_u,
    assert_fused_adam_follows_torch,
    molli_series,
    start_away_from_optimum,
)

adam_mod = importlib.import_module("qmrkit.fit.adam")
TE = np.array([5.0, 10, 20, 35, 55, 80])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adam_follows_torch_adam(dtype):
    """50 steps of the fused update on the MOLLI closed-form gradient retrace torch.optim.Adam."""
    model, data, _ = molli_series(32)
    problem, mapping, u0 = adam_problem_and_u(model, data, dtype=dtype)
    grad_fn = adam_mod._ClosedFormGradient(problem, mapping, "l2", 0.01)
    assert_fused_adam_follows_torch(grad_fn, u0)


@pytest.mark.parametrize("loss", ["l1", "l2", "huber"])
def test_closed_form_gradient_matches_autograd(loss):
    """Per-voxel losses and ∂loss/∂u of the fused path equal autograd's through the sigmoid map,
    with weights (√w scaling) and a non-amplitude log-scaled parameter."""
    model, data, _ = molli_series(40, seed=4)
    w = np.random.default_rng(5).uniform(0.5, 2.0, data.shape)
    problem, mapping, u0 = adam_problem_and_u(model, data, weights=w)
    u0 = u0 + 0.3 * torch.randn(
        u0.shape, generator=torch.Generator().manual_seed(1), dtype=u0.dtype
    )
    vloss, grad = adam_mod._ClosedFormGradient(problem, mapping, loss, 0.01)(u0.clone())
    u = u0.clone().requires_grad_(True)
    ref_v = adam_mod._voxel_loss(problem.residual(mapping.theta(u)), loss, 0.01)
    ref_v.mean().backward()
    torch.testing.assert_close(vloss, ref_v.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, u.grad, rtol=1e-9, atol=1e-18)


def _maps_loss(model, res, data):
    p = {
        par.name: torch.as_tensor(np.asarray(res[par.name]), dtype=torch.float64).reshape(-1, 1)
        for par in model.parameters
    }
    r = (model.forward(p).numpy() - data.reshape(-1, data.shape[-1])) / res.settings["data_scale"]
    return float(np.mean(r * r))


def test_active_set_loss_not_above_full_run():
    """Freezing converged voxels leaves the fit where the full run puts it: the reported loss
    (minimum of the history) is not above the full run's, and the loss of the returned maps,
    evaluated independently in float64, is the full run's to 1e-6 relative (float32 rounding
    alone, e.g. reordering a sum, moves it by ~6e-8; measured here: +1.8e-7)."""
    model, data, t1 = molli_series(2000, seed=7)
    full = fit.adam(model, data, loss="l2", freeze_converged=False, progress=False)
    act = fit.adam(model, data, loss="l2", progress=False)
    assert act.settings["freeze_converged"] and not full.settings["freeze_converged"]
    assert act.settings["n_frozen"] > 0.9 * data.shape[0]
    assert act.iterations <= full.iterations
    assert min(act.loss_history) <= min(full.loss_history)
    lf, la = _maps_loss(model, full, data), _maps_loss(model, act, data)
    assert la <= lf * (1 + 1e-6), (la, lf)
    # the T1 maps agree voxel by voxel far below the noise-driven error (≈1 % median); most
    # voxels are bit-identical. The learning-rate schedule is global and frozen voxels shift
    # when it decays, so a still-running voxel may end at another point of its flat valley:
    # measured (closed-form start of this commit) 99.9th percentile 5.7e-5, one voxel 1.4e-3
    # with a 5e-5 relative loss difference (the previous start: max < 1e-3)
    rel = np.abs(act["T1"].numpy() - full["T1"].numpy()) / full["T1"].numpy()
    assert np.median(rel) < 1e-6 and np.percentile(rel, 99.9) < 1e-4, np.percentile(rel, 99.9)
    assert rel.max() < 5e-3, rel.max()
    # frozen voxels' last iterate is their best one
    same = act["T1"].numpy() == act.final_maps["T1"].numpy()
    assert same.sum() >= act.settings["n_frozen"]


def test_without_freezing_matches_autograd_engine():
    """With ``freeze_converged=False`` the closed-form engine reproduces the autograd engine (a
    regulariser of weight 0 forces that path) to float64 rounding."""
    model = models.MonoExp(TE, kind="T2")
    rng = np.random.default_rng(2)
    t2 = rng.uniform(20, 150, 50)
    data = add_noise(800.0 * np.exp(-TE / t2[:, None]), 8.0, kind="gaussian", seed=3)
    kw = dict(loss="l2", dtype=torch.float64, max_iter=120, progress=False)
    kw["init"] = start_away_from_optimum(model, data)
    zero = fit.Prior("T2", mu=80.0, sigma=50.0, weight=0.0)
    with pytest.warns(Warning):  # 120 iterations are not enough to plateau: both warn
        fused = fit.adam(model, data, freeze_converged=False, **kw)
    with pytest.warns(Warning):
        ref = fit.adam(model, data, regularizers=[zero], **kw)
    np.testing.assert_allclose(fused.loss_history, ref.loss_history, rtol=1e-9)
    np.testing.assert_allclose(fused.final_maps["T2"], ref.final_maps["T2"], rtol=1e-8)
