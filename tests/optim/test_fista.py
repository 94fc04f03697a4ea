"""FISTA on LASSO (closed form and optimality conditions) and on non-negative least squares."""

import numpy as np
import pytest
import scipy.optimize
import torch

from qmrkit.errors import ParameterError, ShapeError
from qmrkit.ops import Matrix
from qmrkit.optim import fista
from qmrkit.optim import prox as P

from ._problems import crandn


def test_lasso_orthonormal_columns_closed_form(device):
    """With AᴴA = I the LASSO solution is soft(Aᴴy, λ) (complex: magnitudes shrink)."""
    q, _ = torch.linalg.qr(crandn((40, 16), 0))
    y = crandn((40,), 1) * 2
    lam = 0.8
    res = fista((Matrix(q), y.to(device)), P.L1(lam), max_iter=500, tol=1e-12)
    ref = P.soft_threshold(q.conj().T @ y, lam)
    assert res.converged
    torch.testing.assert_close(res.x.cpu(), ref, rtol=0, atol=1e-10)
    assert 0 < int((ref != 0).sum()) < 16  # the threshold is active on some entries, not all


@pytest.mark.parametrize("dtype,atol", [(torch.complex128, 1e-10), (torch.complex64, 1e-4)])
def test_lasso_general_matrix_optimality_conditions(dtype, atol, device):
    """KKT: Aᴴ(y − Ax) = λ·x/|x| on the support and |Aᴴ(y − Ax)| <= λ off it."""
    A = crandn((30, 20), 2)
    x_true = torch.zeros(20, dtype=torch.complex128)
    x_true[[1, 5, 11]] = torch.tensor([2.0 + 1j, -1.5j, 1.0], dtype=torch.complex128)
    y = A @ x_true + 0.05 * crandn((30,), 3)
    lam = 2.0
    res = fista(
        (Matrix(A.to(dtype)), y.to(dtype).to(device)),
        P.L1(lam),
        max_iter=5000,
        tol=1e-13 if dtype == torch.complex128 else 1e-7,
    )
    x = res.x.cpu().to(torch.complex128)
    g = A.conj().T @ (y - A @ x)
    on = x.abs() > 1e-6
    assert on.sum() >= 3
    torch.testing.assert_close(g[on], lam * x[on] / x[on].abs(), rtol=0, atol=atol)
    assert float(g[~on].abs().max()) <= lam * (1 + atol)


def test_fista_matches_long_run_and_restart_helps():
    A = crandn((30, 20), 4)
    y = crandn((30,), 5)
    lam = 1.0
    ref = fista((Matrix(A), y), P.L1(lam), max_iter=20000, tol=1e-15).x
    with_restart = fista((Matrix(A), y), P.L1(lam), max_iter=5000, tol=1e-10)
    without = fista((Matrix(A), y), P.L1(lam), max_iter=5000, tol=1e-10, restart=False)
    torch.testing.assert_close(with_restart.x, ref, rtol=0, atol=1e-8)
    torch.testing.assert_close(without.x, ref, rtol=0, atol=1e-7)
    assert with_restart.iterations < without.iterations
    assert with_restart.info["restarts"] > 0


def test_nonnegative_least_squares_matches_scipy_nnls(device):
    rng = np.random.default_rng(6)
    A = rng.standard_normal((25, 10))
    y = rng.standard_normal(25)
    ref, _ = scipy.optimize.nnls(A, y)
    At = torch.from_numpy(A).to(device)
    yt = torch.from_numpy(y).to(device)
    res = fista(
        lambda x: At.T @ (At @ x - yt),
        P.Box(lower=0.0),
        x0=torch.zeros(10, dtype=torch.float64, device=device),
        step=1 / np.linalg.norm(A, 2) ** 2,
        max_iter=20000,
        tol=1e-14,
        objective=lambda x: 0.5 * float(((At @ x - yt) ** 2).sum()),
    )
    np.testing.assert_allclose(res.x.cpu().numpy(), ref, atol=1e-9)
    assert (ref == 0).any()  # the constraint is active
    assert res.objective_history[-1] <= res.objective_history[0]


def test_fista_without_prox_is_accelerated_least_squares():
    A = crandn((20, 6), 7)
    y = crandn((20,), 8)
    res = fista((Matrix(A), y), None, max_iter=2000, tol=1e-13)
    ref = np.linalg.lstsq(A.numpy(), y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(res.x.numpy(), ref, atol=1e-9)


def test_fista_callback_and_bad_input():
    A = Matrix(crandn((8, 4), 9))
    y = crandn((8,), 10)
    res = fista((A, y), P.L1(0.1), max_iter=100, tol=0, callback=lambda k, x: k >= 5)
    assert res.iterations == 5 and not res.converged and len(res.residual_history) == 5
    with pytest.raises(ParameterError, match="step"):
        fista((A, y), P.L1(0.1), step=0.0)
    with pytest.raises(ParameterError, match="step"):
        fista((A, y), P.L1(0.1), step=-1.0)
    with pytest.raises(ParameterError, match="x0 is required"):
        fista(lambda x: x, P.L1(0.1), step=0.1)
    with pytest.raises(ParameterError, match="step is required"):
        fista(lambda x: x, P.L1(0.1), x0=torch.zeros(3))
    with pytest.raises(ShapeError, match="y must have shape"):
        fista((A, crandn((4,), 0)), P.L1(0.1))
    with pytest.raises(ShapeError, match="x0 has shape"):
        fista((A, y), P.L1(0.1), x0=torch.zeros(5, dtype=torch.complex128))
    with pytest.raises(ParameterError, match="tol"):
        fista((A, y), P.L1(0.1), tol=-1)
    with pytest.raises(ParameterError, match="prox_g must be callable"):
        fista((A, y), 3.0)
