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
