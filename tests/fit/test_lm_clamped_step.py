"""fit.lm: a trial step cut by the parameter bounds must not end a voxel as converged.

The quadratic-model gain of a clamped step can be <= 0 far from any minimum (the clamped step is
not the Levenberg–Marquardt step); before the fix lm stopped such voxels with reason "ftol" at
their start (5 of these 400 voxels; SANDI fits hit it often, tests/models/test_diffusion_sandi.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from qmrkit import fit


def test_clamped_trial_step_is_not_convergence():
    x = np.linspace(0, 1, 12)

    def f(p1, p2, p3, x):
        return p1 * x + p2 * (x + 0.1 * x * x) + torch.exp(-p3 * x)

    model = fit.model_from_function(
        f, {"p1": (0.0, 1.0), "p2": (-20.0, 20.0), "p3": (0.0, 5.0)}, x=x
    )
    rng = np.random.default_rng(0)
    n = 400
    truth = {
        "p1": rng.uniform(0.3, 0.9, n),
        "p2": rng.uniform(-2, 2, n),
        "p3": rng.uniform(0.5, 4, n),
    }
    data = model.simulate(truth).numpy()
    init = {
        "p1": rng.uniform(0.05, 0.95, n),
        "p2": rng.uniform(-3, 3, n),
        "p3": rng.uniform(0.1, 4.9, n),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script, forward-mode AD
        res = fit.lm(model, data, init=init, dtype=torch.float64, max_iter=200, progress=False)
    for k in truth:
        np.testing.assert_allclose(res[k].numpy(), truth[k], rtol=0, atol=1e-6)
