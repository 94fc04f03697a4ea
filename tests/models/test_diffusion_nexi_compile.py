"""NEXI(compile=True): the torch.compile-fused kernel against the eager one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmrkit.models.diffusion.nexi import NEXI

# GACELLE demo 1 protocol (paper 004, table S1): 15 b-values over Δ = 13, 21, 30 ms
B = np.array([2.3, 3.5, 4.8, 6.5] * 3 + [11.3, 11.3, 17.3])
DELTA = np.array([13] * 4 + [21] * 4 + [30] * 4 + [21, 30, 30.0])
NAMES = ("f", "Dn", "De", "rn", "p2")


@pytest.mark.slow  # two torch.compile runs (~10–20 s each on 2 cores, cached on disk afterwards)
def test_compiled_kernel_equals_eager():
    """NEXI(compile=True) fuses the kernel for full 4096-voxel chunks (the remainder runs eagerly):
    signal and analytic Jacobian equal the eager ones to float32 rounding."""
    n = 4096 + 7
    rng = np.random.default_rng(13)
    p = {
        "f": rng.uniform(0, 1, n),
        "Dn": rng.uniform(0.01, 3.5, n),
        "De": rng.uniform(0.01, 3.5, n),
        "rn": 10 ** rng.uniform(np.log10(1 / 250), 0, n),
        "p2": rng.uniform(0, 1, n),
    }
    cols = {k: torch.tensor(v, dtype=torch.float32)[:, None] for k, v in p.items()}
    eager = NEXI(B, DELTA, orders=(0, 2), compile=False).to(dtype=torch.float32)
    fused = NEXI(B, DELTA, orders=(0, 2), compile=True).to(dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(
            fused.forward(cols).numpy(), eager.forward(cols).numpy(), rtol=2e-5, atol=1e-7
        )
        sig_f, grad_f = fused.jacobian(cols)
        sig_e, grad_e = eager.jacobian(cols)
    np.testing.assert_allclose(sig_f.numpy(), sig_e.numpy(), rtol=2e-5, atol=1e-7)
    # both float32 paths against the float64 derivatives: the fused one is no less accurate
    ref = NEXI(B, DELTA, orders=(0, 2)).jacobian({k: v.double() for k, v in cols.items()})[1]
    for k in NAMES:
        r = ref[k].numpy()
        scale = np.abs(r).max(axis=1, keepdims=True) + 1e-300
        err_f = (np.abs(grad_f[k].numpy() - r) / scale).max(axis=1)
        err_e = (np.abs(grad_e[k].numpy() - r) / scale).max(axis=1)
        assert np.median(err_f) < 1e-5, (k, np.median(err_f))
        assert np.percentile(err_f, 99) <= 2 * np.percentile(err_e, 99) + 1e-6, k
        assert err_f.max() <= 2 * err_e.max() + 1e-6, (k, err_f.max(), err_e.max())


@pytest.mark.slow  # compiles forward and backward graphs (~20–40 s on 2 cores, cached afterwards)
def test_compiled_kernel_gradients_equal_eager():
    """fit.adam differentiates NEXI.forward by autograd; through the compiled kernel (as for whole
    volumes of >= 16,384 voxels) the gradients equal the eager ones (float64, 4096 voxels)."""
    n = 4096
    rng = np.random.default_rng(14)
    vals = {
        "f": rng.uniform(0.05, 0.95, n),
        "Dn": rng.uniform(0.3, 3.5, n),
        "De": rng.uniform(0.1, 3.0, n),
        "rn": 10 ** rng.uniform(np.log10(1 / 250), 0, n),
        "p2": rng.uniform(0, 1, n),
    }
    grads = []
    for comp in (False, True):
        model = NEXI(B, DELTA, orders=(0, 2), compile=comp)
        p = {k: torch.tensor(v)[:, None].requires_grad_(True) for k, v in vals.items()}
        w = torch.linspace(0.5, 1.5, 30, dtype=torch.float64)
        (model.forward(p) * w).sum().backward()
        grads.append({k: p[k].grad.numpy().copy() for k in NAMES})
    for k in NAMES:
        np.testing.assert_allclose(grads[1][k], grads[0][k], rtol=1e-9, atol=1e-12, err_msg=k)
