"""PDHG on TV denoising and TV reconstruction against independent high-accuracy references."""

import itertools

import numpy as np
import pytest
import torch

from qmrkit.errors import ParameterError, ShapeError
from qmrkit.ops import FFT, FiniteDifference, Mask, Vstack
from qmrkit.optim import fista, pdhg
from qmrkit.optim import prox as P

from ._problems import crandn


def _piecewise_1d(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.zeros(n, dtype=torch.float64)
    b[n // 4 : n // 2] = 1.0
    b[n // 2 : 3 * n // 4] = -0.5
    return b + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)


def _phantom_2d(n=12, seed=1, dtype=torch.complex128, noise=0.1):
    x = torch.zeros(n, n, dtype=dtype)
    x[2:7, 3:9] = 1.0
    x[5:10, 6:10] += 0.5j
    return x + noise * crandn((n, n), seed, dtype) if noise else x


_REFERENCES = {}


def _tv_dual_reference(D, b, lam, axis):
    """TV denoising through its dual, min_{‖z_i‖ <= λ} ½‖b − Dᴴz‖², by projected FISTA
    (float64/complex128, run to a relative change of 1e-15; cached per problem)."""
    key = (D.ishape, D.boundary, lam, axis, b.dtype, b.numpy().tobytes())
    if key not in _REFERENCES:
        _REFERENCES[key] = _tv_dual_reference_uncached(D, b, lam, axis)
    x, z = _REFERENCES[key]
    return x.clone(), z.clone()


def _tv_dual_reference_uncached(D, b, lam, axis):
    proj = P.GroupLinfBall(lam, axis=axis)
    L = 4.0 * len(D.axes)  # ‖D‖² <= 4 per axis (unit spacing)
    z0 = torch.zeros(D.oshape, dtype=b.dtype)
    res = fista(lambda z: D(D.H(z) - b), proj, x0=z0, step=1 / L, max_iter=100000, tol=1e-15)
    assert res.converged
    return b - D.H(res.x), res.x


def _tv_primal(D, b, lam, axis):
    return lambda x: (
        0.5 * float(torch.linalg.vector_norm(x - b) ** 2)
        + lam * float(torch.linalg.vector_norm(D(x), dim=axis).sum())
    )


def _tv_dual(D, b):
    def dual(z):
        w = D.H(z)
        return float((w.conj() * b).real.sum()) - 0.5 * float(torch.linalg.vector_norm(w) ** 2)

    return dual


def test_tv_1d_reference_satisfies_optimality():
    """The dual-FISTA reference itself meets the TV-denoising KKT conditions (an independent check
    of the reference, not of PDHG)."""
    b, lam = _piecewise_1d(), 0.3
    D = FiniteDifference((64,), boundary="neumann")
    x, z = _tv_dual_reference(D, b, lam, axis=-2)
    torch.testing.assert_close(x, b - D.H(z))
    assert float(z.abs().max()) <= lam * (1 + 1e-12)
    dx = D(x)[0]
    jump = dx.abs() > 1e-8
    assert 2 <= int(jump.sum()) < 63  # piecewise constant with a few jumps
    torch.testing.assert_close(z[0][jump], lam * torch.sign(dx[jump]), rtol=0, atol=1e-9)


def test_pdhg_tv_1d_matches_reference_and_gap_decreases(device):
    b, lam = _piecewise_1d(), 0.3
    D = FiniteDifference((64,), boundary="neumann")
    ref, _ = _tv_dual_reference(D, b, lam, axis=-2)
    primal, dual = _tv_primal(D, b, lam, -2), _tv_dual(D, b)
    gaps = []
    res = pdhg(
        D,
        P.conjugate(P.GroupL1(lam, axis=-2)),
        P.L2Squared(b.to(device)),
        x0=b.to(device),
        max_iter=5000,
        tol=1e-11,
        callback=lambda k, x, z: gaps.append(primal(x.cpu()) - dual(z.cpu())),
    )
    assert res.converged
    torch.testing.assert_close(res.x.cpu(), ref, rtol=0, atol=1e-8)
    assert min(gaps) >= -1e-10  # weak duality
    checkpoints = [gaps[k] for k in (10, 100, 400, len(gaps) - 1)]
    assert all(a > b for a, b in itertools.pairwise(checkpoints)), checkpoints
    assert gaps[-1] < 1e-9
    assert res.residual_history[-1] <= 1e-11
    assert len(res.primal_residual_history) == res.iterations


@pytest.mark.parametrize("dtype,atol", [(torch.complex128, 1e-6), (torch.complex64, 1e-4)])
def test_pdhg_isotropic_tv_2d_complex(dtype, atol, device):
    b, lam = _phantom_2d(), 0.2
    D = FiniteDifference((12, 12), boundary="neumann")
    ref, _ = _tv_dual_reference(D, b, lam, axis=-3)
    res = pdhg(
        D,
        P.conjugate(P.GroupL1(lam, axis=-3)),
        P.L2Squared(b.to(dtype).to(device)),
        x0=b.to(dtype).to(device),
        max_iter=3000,
        tol=1e-10 if dtype == torch.complex128 else 1e-6,
    )
    err = float((res.x.cpu().to(torch.complex128) - ref).abs().max())
    assert err < atol, (err, res.iterations)
    # isotropic, not anisotropic: the anisotropic (L1) solution is measurably different
    aniso = pdhg(
        D, P.conjugate(P.L1(lam)), P.L2Squared(b), x0=b.clone(), max_iter=3000, tol=1e-10
    ).x
    assert float((aniso - ref).abs().max()) > 100 * atol


@pytest.mark.parametrize("tau", [0.02, 20.0])
def test_pdhg_adaptive_steps_remove_step_ratio_sensitivity(tau):
    """From a badly balanced start (τ/σ off by 10⁴ either way) adaptive steps still reach the
    reference; fixed steps at τ = 20 are far from it after the same number of iterations."""
    b, lam = _phantom_2d(), 0.2
    D = FiniteDifference((12, 12), boundary="neumann")
    ref, _ = _tv_dual_reference(D, b, lam, axis=-3)
    kw = dict(x0=b.clone(), max_iter=3000, tol=0, tau=tau)
    fstar, g = P.conjugate(P.GroupL1(lam, axis=-3)), P.L2Squared(b)
    adaptive = pdhg(D, fstar, g, adaptive=True, **kw)
    assert float((adaptive.x - ref).abs().max()) < 1e-5
    assert adaptive.info["step_adaptations"] > 0
    if tau == 20.0:
        fixed = pdhg(D, fstar, g, adaptive=False, **kw)
        assert float((fixed.x - ref).abs().max()) > 1e-3


def test_pdhg_accelerated_variant_converges_to_the_same_solution():
    b, lam = _phantom_2d(), 0.2
    D = FiniteDifference((12, 12), boundary="neumann")
    ref, _ = _tv_dual_reference(D, b, lam, axis=-3)
    res = pdhg(
        D,
        P.conjugate(P.GroupL1(lam, axis=-3)),
        P.L2Squared(b),
        x0=b.clone(),
        max_iter=2000,
        tol=0,
        strong_convexity=1.0,
    )
    # O(1/k²) guarantees, but here slower than the plain method's near-linear convergence
    assert float((res.x - ref).abs().max()) < 5e-4
    assert res.info["tau"] < 0.05 < res.info["sigma"]  # steps were adapted


def _undersampled_problem(n=16, seed=3):
    x = _phantom_2d(n, seed, noise=0)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 1, generator=g) < 0.5
    mask[n // 2 - 2 : n // 2 + 2] = True
    A = Mask(mask, shape=(n, n)) @ FFT((n, n))
    y = A(x) + 0.02 * Mask(mask, shape=(n, n))(crandn((n, n), seed + 1))
    return A, mask, y


def test_tv_reconstruction_two_formulations_agree():
    """K = [A; D] with a stacked dual prox equals K = D with the exact data-term prox
    (Fᴴ(I + τM)⁻¹(Fv + τMy) for A = M·F with F unitary)."""
    n, lam = 16, 0.05
    A, mask, y = _undersampled_problem(n)
    F = FFT((n, n))
    D = FiniteDifference((n, n), boundary="neumann")
    K = Vstack([A, D])
    dual = P.Stack(K, [P.conjugate(P.L2Squared(y)), P.conjugate(P.GroupL1(lam, axis=-3))])
    x0 = A.H(y)
    stacked = pdhg(K, dual, None, x0=x0, max_iter=1500, tol=0)
    m = Mask(mask, shape=(n, n)).mask.to(torch.float64)

    def data_prox(v, tau):
        return F.H((F(v) + tau * m * y) / (1 + tau * m))

    split = pdhg(D, P.conjugate(P.GroupL1(lam, axis=-3)), data_prox, x0=x0, max_iter=1500, tol=0)
    # without strong convexity PDHG converges slowly (residual ~1e-6 after 1500 iterations);
    # the two routes agree to that accuracy
    for r in (stacked, split):
        assert r.residual_history[-1] < 1e-3 * r.residual_history[0]
    torch.testing.assert_close(stacked.x, split.x, rtol=0, atol=1e-5)
    # and TV helps here: closer to the noiseless phantom than the zero-filled image
    truth = _phantom_2d(n, 3, noise=0)
    assert torch.linalg.vector_norm(stacked.x - truth) < torch.linalg.vector_norm(x0 - truth)


def test_pdhg_batch_equals_separate_solves():
    lam = 0.2
    D = FiniteDifference((12, 12), boundary="neumann")
    B = torch.stack([_phantom_2d(12, 1), _phantom_2d(12, 2)])
    kw = dict(max_iter=4000, tol=1e-11)
    both = pdhg(D, P.conjugate(P.GroupL1(lam, axis=-3)), P.L2Squared(B), x0=B.clone(), **kw)
    assert both.info["batch_ndim"] == 1 and both.z.shape == (2, 2, 12, 12)
    for i in range(2):
        one = pdhg(
            D, P.conjugate(P.GroupL1(lam, axis=-3)), P.L2Squared(B[i]), x0=B[i].clone(), **kw
        )
        # the batch shares (adaptive) steps, so iterates differ; the solutions agree
        torch.testing.assert_close(both.x[i], one.x, rtol=0, atol=1e-6)


def test_pdhg_step_rules_and_bad_input():
    D = FiniteDifference((8,), boundary="periodic")
    b = _piecewise_1d(8)
    fstar, g = P.conjugate(P.L1(0.1)), P.L2Squared(b)
    res = pdhg(D, fstar, g, x0=b.clone(), max_iter=3, tol=0, adaptive=False)
    s, t, n2 = res.info["sigma"], res.info["tau"], res.info["norm2"]
    assert s == pytest.approx(t) and s * t * n2 == pytest.approx(1 / 1.05, rel=1e-9)
    assert abs(n2 - 4.0) < 1e-3  # periodic 1-D difference on an even grid: ‖D‖² = 4
    res = pdhg(D, fstar, g, x0=b.clone(), tau=0.1, max_iter=3, tol=0, adaptive=False)
    assert res.info["tau"] == 0.1 and res.info["sigma"] * 0.1 * res.info["norm2"] == pytest.approx(
        1 / 1.05
    )
    res = pdhg(
        D,
        fstar,
        g,
        x0=b.clone(),
        tau=0.1,
        sigma=0.2,
        max_iter=3,
        tol=0,
        callback=lambda k, x, z: k == 2,
    )
    assert res.info["norm2"] is None and res.iterations == 2
    # default start: zeros in the requested dtype
    res = pdhg(D, fstar, g, max_iter=2, tol=0, dtype=torch.float64)
    assert res.x.dtype == torch.float64
    for bad in (
        dict(sigma=0.0),
        dict(tau=-1.0),
        dict(theta=1.5),
        dict(tol=-1.0),
        dict(max_iter=0),
        dict(strong_convexity=-1.0),
    ):
        with pytest.raises(ParameterError):
            pdhg(D, fstar, g, x0=b.clone(), **bad)
    with pytest.raises(ShapeError, match=r"x0 must have shape \(\*batch, 8\)"):
        pdhg(D, fstar, g, x0=torch.zeros(9, dtype=torch.float64))
    with pytest.raises(ShapeError, match="z0 has shape"):
        pdhg(D, fstar, g, x0=b.clone(), z0=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ParameterError, match="LinearOperator"):
        pdhg(np.eye(3), fstar, g)
