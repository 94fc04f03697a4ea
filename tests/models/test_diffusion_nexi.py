"""NEXI: closed-form Kärger kernel vs scipy expm + quad (float64), and recovery by fit.lm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.linalg import expm

from qmrkit import fit
from qmrkit.models.diffusion.nexi import NEXI

# GACELLE demo 1 protocol (paper 004, table S1): 15 b-values over Δ = 13, 21, 30 ms
B = np.array([2.3, 3.5, 4.8, 6.5] * 3 + [11.3, 11.3, 17.3])
DELTA = np.array([13] * 4 + [21] * 4 + [30] * 4 + [21, 30, 30.0])
NAMES = ("f", "Dn", "De", "rn", "p2")


def _reference(b, t, f, dn, de, rn, l):
    """∫₀¹ [1,1]·expm(−M(ξ))·[f, 1−f]·P_l(ξ) dξ with scipy, float64."""
    re = rn * f / (1 - f)

    def s(x):
        m = np.array([[b * dn * x * x + rn * t, -re * t], [-rn * t, b * de + re * t]])
        return np.ones(2) @ expm(-m) @ np.array([f, 1 - f])

    p = (lambda x: 1.0) if l == 0 else (lambda x: 0.5 * (3 * x * x - 1))
    return quad(lambda x: s(x) * p(x), 0, 1, epsabs=1e-15, epsrel=1e-13, limit=200)[0]


@pytest.mark.slow  # ~15-30 s on 2 shared cores: 240 scipy quad integrals of expm
def test_signal_equals_scipy_expm_quad():
    model = NEXI(B, DELTA, orders=(0, 2))
    rng = np.random.default_rng(0)
    for _ in range(8):
        vals = [
            rng.uniform(0.05, 0.95),
            rng.uniform(0.3, 3.5),
            rng.uniform(0.1, 3.0),
            10 ** rng.uniform(-2.4, 0),
            rng.uniform(0, 1),
        ]
        p = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in zip(NAMES, vals, strict=True)}
        out = model.forward(p)[0].numpy()
        f, dn, de, rn, p2 = vals
        ref = np.array(
            [
                [_reference(b, t, f, dn, de, rn, 0), -p2 * _reference(b, t, f, dn, de, rn, 2)]
                for b, t in zip(B, DELTA, strict=True)
            ]
        ).reshape(-1)
        np.testing.assert_allclose(out, ref, rtol=1e-6)  # 7e-14 measured


def test_recovery_noise_free_lm_float64():
    rng = np.random.default_rng(1)
    truth = {
        "f": rng.uniform(0.3, 0.6, 6),
        "Dn": rng.uniform(1.5, 2.5, 6),
        "De": rng.uniform(0.5, 1.2, 6),
        "rn": rng.uniform(0.02, 0.2, 6),
        "p2": rng.uniform(0.3, 0.7, 6),
    }
    model = NEXI(B, DELTA, orders=(0, 2))
    data = model.simulate(truth).numpy()
    res = fit.lm(model, data, dtype=torch.float64, n_atoms=2000, progress=False)
    for k in NAMES:
        np.testing.assert_allclose(res[k].numpy(), truth[k], rtol=1e-6)
    np.testing.assert_allclose(res["tex"].numpy(), (1 - truth["f"]) / truth["rn"], rtol=1e-6)
