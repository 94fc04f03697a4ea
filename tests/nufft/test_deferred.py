"""Cheap plans: memoised error estimates, the interpolation data deferred to the first transform
and the Toeplitz kernel to the first normal application — same results as eager ones."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from nufft_testutils import crandn, ndft_matrix, rel

from qmrkit import nufft
from qmrkit.nufft import kernels, planner
from qmrkit.nufft.grid import grid_size
from qmrkit.nufft.native import NativeEngine
from qmrkit.nufft.toeplitz import ToeplitzNormal

plan_mod = importlib.import_module("qmrkit.nufft.plan")  # the module (nufft.plan is the function)

TRAJ = np.random.default_rng(5).uniform(-0.5, 0.5, (900, 2)).astype(np.float32)
IM = (14, 16)


def _per_alias_reference(kernel, n, grid, n_alias=3):
    """The aliasing error with one quadrature per alias (the former algorithm), written out."""
    r = np.arange(n, dtype=np.float64) - n // 2
    main = kernels.kernel_ft(kernel, r, grid)
    alias = sum(
        kernels.kernel_ft(kernel, r + s * ell * grid, grid) ** 2
        for s in (-1, 1)
        for ell in range(1, n_alias + 1)
    )
    return float(np.sqrt(np.mean(alias / main**2)))


@pytest.mark.parametrize(("n", "sigma", "width"), [(16, 1.25, 6), (64, 2.0, 7), (255, 1.5, 9)])
def test_aliasing_error_matches_per_alias_quadrature(n, sigma, width):
    k = kernels.Kernel(width, kernels.beta_rule(width, sigma), sigma)
    g = grid_size(n, sigma, width)
    # the shared quadrature uses at least as many nodes as each per-alias one (converged)
    assert kernels.aliasing_error(k, n, g) == pytest.approx(_per_alias_reference(k, n, g), 1e-3)


def test_estimates_are_memoised():
    kernels.aliasing_error.cache_clear()
    planner._choose_for_sigma.cache_clear()
    a = planner.choose_for_sigma(1e-6, 1.5, (40, 48))
    b = planner.choose_for_sigma(1e-6, 1.5, [40, 48])
    assert a == b and planner._choose_for_sigma.cache_info().hits == 1


@pytest.mark.parametrize("method", ["sparse", "binned", "gather"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_interpolation_data_deferred_to_first_transform(method, dtype):
    """A planned engine computes its weights (and sparse matrices / bins) at the first transform;
    the results are those of an engine built eagerly, and of the exact NDFT to ε."""
    op = nufft.plan(TRAJ, IM, eps=1e-6, method=method, backend="torch", dtype=dtype)
    eng = op.engines[0]
    assert eng._traj is not None and eng.csr is None and eng.binned is None and not eng.idx
    assert op.info.memory_bytes > 0  # the planner's estimate until then
    x = crandn((2, *IM), dtype=dtype, seed=1)
    y = crandn((2, TRAJ.shape[0]), dtype=dtype, seed=2)
    fwd = op(x)
    assert eng._traj is None
    assert (eng.csr is not None) == (method == "sparse")
    assert (eng.binned is not None) == (method == "binned")
    adj = op.H(y)
    eager = NativeEngine(
        torch.as_tensor(TRAJ),
        IM,
        eng.grid,
        eng.kernel,
        dtype,
        method,
        accumulate_double=eng.acc == torch.float64 and dtype == torch.complex64,
    )
    assert torch.equal(fwd, eager.forward(x)) and torch.equal(adj, eager.adjoint(y))
    a = torch.as_tensor(ndft_matrix(TRAJ, IM))  # exact float64 NDFT
    exact_fwd = x.reshape(2, -1).to(torch.complex128) @ a.T
    exact_adj = (y.to(torch.complex128) @ a.conj()).reshape(2, *IM)
    tol = 5e-6 if dtype == torch.complex64 else 2e-6
    assert rel(fwd.reshape(2, -1), exact_fwd) < tol and rel(adj, exact_adj) < tol


def test_toeplitz_kernel_built_at_first_normal_equals_eager():
    op = nufft.plan(TRAJ, IM, eps=1e-6, normal="toeplitz", dtype=torch.complex128)
    assert op.toeplitz._kernel is None
    expected_bytes = op.toeplitz.memory_bytes()
    x = crandn(IM, dtype=torch.complex128, seed=3)
    got = op.normal(x)
    assert op.toeplitz._kernel is not None
    assert op.toeplitz.memory_bytes() == expected_bytes == 8 * 4 * IM[0] * IM[1]
    # an eagerly built operator from the same PSF gives the same values
    traj = torch.as_tensor(TRAJ)[None]
    psf = plan_mod._psf(op.info.backend, traj, IM, 1e-6, torch.complex128)[0]
    eager = ToeplitzNormal(psf, IM, torch.complex128)
    assert rel(got, eager(x)) < 1e-13
    a = torch.as_tensor(ndft_matrix(TRAJ, IM))
    exact = (a.conj().T @ (a @ x.reshape(-1))).reshape(IM)
    assert rel(got, exact) < 1e-5
