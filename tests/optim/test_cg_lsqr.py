"""CG and CGLS against dense NumPy solutions."""

import numpy as np
import pytest
import torch

from qmrkit.errors import ParameterError, ShapeError
from qmrkit.ops import FFT, Mask, Matrix, Sense
from qmrkit.optim import cg, lsqr

from ._problems import crandn, spd_matrix


def test_cg_spd_float64_matches_numpy_solve(device):
    S = spd_matrix(40, 1e3, 0)
    b = np.random.default_rng(1).standard_normal(40)
    St = torch.from_numpy(S).to(device)
    res = cg(lambda x: St @ x, torch.from_numpy(b).to(device), max_iter=500, tol=1e-13)
    ref = np.linalg.solve(S, b)
    assert res.converged and res.iterations <= 200
    np.testing.assert_allclose(res.x.cpu().numpy(), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    assert res.residual_history[-1] <= 1e-13
    assert res.elapsed_s > 0


def test_cg_hermitian_complex64_matches_numpy_solve(device):
    S = spd_matrix(24, 30, 2, np.complex128)
    b = np.random.default_rng(3).standard_normal(24) + 0j
    St = torch.from_numpy(S.astype(np.complex64)).to(device)
    res = cg(
        lambda x: St @ x,
        torch.from_numpy(b.astype(np.complex64)).to(device),
        max_iter=200,
        tol=1e-6,
    )
    ref = np.linalg.solve(S, b)
    err = np.linalg.norm(res.x.cpu().numpy() - ref) / np.linalg.norm(ref)
    assert res.converged and err < 1e-5


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_cg_on_operator_uses_normal_and_lam(lam, device):
    A = crandn((30, 12), 4)
    y = crandn((30,), 5)
    op = Matrix(A)
    b = op.H(y.to(device))
    res = cg(op, b, lam=lam, max_iter=100, tol=1e-12)
    An = A.numpy()
    ref = np.linalg.solve(An.conj().T @ An + lam * np.eye(12), An.conj().T @ y.numpy())
    np.testing.assert_allclose(res.x.cpu().numpy(), ref, atol=1e-10)


def test_cg_batched_right_hand_sides_are_independent_systems(device):
    """Each batch entry is solved with its own steps: same answers as separate solves."""
    A = Matrix(crandn((20, 8), 6))
    scales = torch.tensor([1.0, 1e-3, 1e3], dtype=torch.float64)
    B = crandn((3, 8), 7) * scales[:, None]
    B = B.to(device)
    res = cg(A, B, max_iter=100, tol=1e-12)
    assert res.converged and res.info["batch_ndim"] == 1
    for i in range(3):
        single = cg(A, B[i], max_iter=100, tol=1e-12)
        torch.testing.assert_close(res.x[i], single.x, rtol=1e-9, atol=1e-12 * float(scales[i]))
    # a zero right-hand side in a batch stays exactly zero
    B0 = B.clone()
    B0[1] = 0
    assert torch.count_nonzero(cg(A, B0, max_iter=50, tol=1e-10).x[1]) == 0


def test_cg_callable_with_batch_ndim():
    S = torch.from_numpy(spd_matrix(12, 50, 13))
    B = torch.from_numpy(np.random.default_rng(14).standard_normal((3, 12))) * torch.tensor(
        [[1.0], [1e-4], [1e4]], dtype=torch.float64
    )
    res = cg(lambda x: x @ S.T, B, batch_ndim=1, max_iter=100, tol=1e-12)
    ref = torch.linalg.solve(S, B.T).T
    assert res.converged
    torch.testing.assert_close(res.x, ref, rtol=1e-9, atol=0)
    with pytest.raises(ParameterError, match="batch_ndim"):
        cg(lambda x: x @ S.T, B, batch_ndim=2)


def test_cg_small_cartesian_sense_equals_dense_least_squares():
    """CG on Mask·FFT·Sense equals the least-squares solution of the explicit matrix (1e-5)."""
    ny, nx, nc = 8, 6, 4
    maps = crandn((nc, ny, nx), 8, torch.complex64)
    mask = torch.zeros(ny, 1, dtype=torch.bool)
    mask[::2] = True
    mask[ny // 2 - 1 : ny // 2 + 1] = True
    shape = (nc, ny, nx)
    A = Mask(mask, shape=shape) @ FFT(shape, axes=(-2, -1)) @ Sense(maps)
    x_true = crandn((ny, nx), 9, torch.complex64)
    y = A(x_true) + 0.01 * Mask(mask, shape=shape)(crandn(shape, 10, torch.complex64))
    res = cg(A, A.H(y), max_iter=200, tol=1e-7)
    eye = torch.eye(ny * nx, dtype=torch.complex128).reshape(-1, ny, nx)
    Am = A(eye.to(torch.complex64)).reshape(ny * nx, -1).T.to(torch.complex128).numpy()
    ref = np.linalg.lstsq(Am, y.reshape(-1).to(torch.complex128).numpy(), rcond=None)[0]
    err = np.linalg.norm(res.x.reshape(-1).numpy() - ref) / np.linalg.norm(ref)
    assert res.converged and err < 1e-5, err


def test_cg_start_callback_and_trivial_cases():
    S = torch.from_numpy(spd_matrix(10, 10, 11))
    b = torch.from_numpy(np.random.default_rng(12).standard_normal(10))
    exact = torch.linalg.solve(S, b)
    res = cg(lambda x: S @ x, b, x0=exact, tol=1e-10)
    assert res.converged and res.iterations == 0
    res = cg(lambda x: S @ x, torch.zeros(10, dtype=torch.float64))
    assert res.converged and res.iterations == 0 and torch.all(res.x == 0)
    seen = []
    res = cg(lambda x: S @ x, b, max_iter=50, tol=0, callback=lambda k, x: seen.append(k) or k == 3)
    assert res.iterations == 3 and seen == [1, 2, 3] and not res.converged
    res = cg(lambda x: S @ x, b, max_iter=4, tol=0)
    assert res.iterations == 4 and len(res.residual_history) == 4 and not res.converged


def test_cg_bad_input():
    A = Matrix(crandn((6, 4), 0))
    b = crandn((4,), 1)
    with pytest.raises(ShapeError, match=r"b must have shape \(\*batch, 4\).*got \(5,\)"):
        cg(A, crandn((5,), 1))
    with pytest.raises(ShapeError, match="x0 has shape"):
        cg(A, b, x0=crandn((2, 4), 1))
    with pytest.raises(ParameterError, match="lam"):
        cg(A, b, lam=-1.0)
    with pytest.raises(ParameterError, match="tol"):
        cg(A, b, tol=-1e-6)
    with pytest.raises(ParameterError, match="max_iter"):
        cg(A, b, max_iter=0)
    with pytest.raises(ParameterError, match="LinearOperator or a callable"):
        cg("A", b)


# -- lsqr (CGLS) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-10), (torch.complex64, 1e-4)])
def test_lsqr_matches_numpy_lstsq_on_tall_complex_matrix(dtype, tol, device):
    A = crandn((50, 15), 20)
    y = crandn((50,), 21)
    ref = np.linalg.lstsq(A.numpy(), y.numpy(), rcond=None)[0]
    res = lsqr(
        Matrix(A.to(dtype)),
        y.to(dtype).to(device),
        max_iter=100,
        tol=1e-12 if dtype == torch.complex128 else 1e-6,
    )
    err = np.linalg.norm(res.x.cpu().numpy() - ref) / np.linalg.norm(ref)
    assert err < tol, err
    assert res.info["algorithm"] == "CGLS"
    r_ref = np.linalg.norm(A.numpy() @ ref - y.numpy())
    assert abs(res.info["data_residual"] - r_ref) < 1e-4 * r_ref


def test_lsqr_tikhonov_and_batch_match_closed_form(device):
    A = crandn((25, 10), 22)
    Y = crandn((2, 25), 23).to(device)
    lam = 0.7
    res = lsqr(Matrix(A), Y, lam=lam, max_iter=200, tol=1e-12)
    An = A.numpy()
    H = An.conj().T @ An + lam * np.eye(10)
    for i in range(2):
        ref = np.linalg.solve(H, An.conj().T @ Y[i].cpu().numpy())
        np.testing.assert_allclose(res.x[i].cpu().numpy(), ref, atol=1e-10)
    # the same problem through cg on the normal equations
    res_cg = cg(Matrix(A), Matrix(A).H(Y), lam=lam, max_iter=200, tol=1e-12)
    torch.testing.assert_close(res.x, res_cg.x, rtol=1e-8, atol=1e-10)


def test_lsqr_bad_input():
    A = Matrix(crandn((6, 4), 0))
    with pytest.raises(ShapeError, match=r"y must have shape \(\*batch, 6\)"):
        lsqr(A, crandn((4,), 1))
    with pytest.raises(ParameterError, match="LinearOperator"):
        lsqr(lambda x: x, crandn((6,), 1))
    with pytest.raises(ShapeError, match="x0"):
        lsqr(A, crandn((6,), 1), x0=crandn((6,), 1))
    with pytest.raises(ShapeError, match=r"x0 has batch shape \(3,\) but y has batch shape \(2,\)"):
        lsqr(A, crandn((2, 6), 1), x0=crandn((3, 4), 1))
    with pytest.raises(ParameterError, match="tol"):
        lsqr(A, crandn((6,), 1), tol=float("nan"))


def test_cg_stops_and_warns_on_non_finite_values():
    from qmrkit.errors import ConvergenceWarning

    with pytest.warns(ConvergenceWarning, match="non-finite"):
        res = cg(lambda x: x * float("nan"), torch.ones(3, dtype=torch.float64), max_iter=10)
    assert not res.converged and res.iterations == 1


def test_progress_bar_option_runs(capsys):
    A = Matrix(crandn((6, 4), 0))
    res = cg(A, A.H(crandn((6,), 1)), max_iter=5, tol=0, progress=True)
    assert res.iterations == 5
    res = lsqr(A, crandn((6,), 1), max_iter=5, tol=0, progress=True)
    assert res.iterations == 5
