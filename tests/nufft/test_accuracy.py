"""Forward and adjoint against an exact float64 direct NDFT: relative ℓ2 error ≤ ε."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from nufft_testutils import crandn, ndft_matrix, rel

from qmrkit import nufft
from qmrkit._optional import available
from qmrkit.errors import ParameterError

HAS_FINUFFT = available("finufft")


@functools.cache
def problem(kind: str, im_size: tuple[int, ...]):
    """(trajectory, exact matrix) for a small problem; cached across tests."""
    rng = np.random.default_rng(sum(im_size) + len(kind))
    nd = len(im_size)
    if kind == "random":
        traj = rng.uniform(-0.5, 0.5, (400, nd))
    elif kind == "radial":
        traj = nufft.golden_angle_radial(13, 2 * max(im_size)).numpy()
    elif kind == "spiral":
        traj = nufft.spiral(4, 150, max(im_size), density=1.5).numpy()
    elif kind == "radial3d":
        traj = nufft.radial_3d(40, 2 * max(im_size)).numpy()
    elif kind == "stars":
        traj = nufft.stack_of_stars(9, 2 * max(im_size[1:]), im_size[0]).numpy()
    else:  # pragma: no cover
        raise ValueError(kind)
    return traj, ndft_matrix(traj, im_size)


CASES = [
    ("random", (32,)),
    ("random", (25,)),
    ("random", (20, 17)),
    ("radial", (32, 32)),
    ("spiral", (21, 24)),
    ("random", (10, 11, 12)),
    ("radial3d", (12, 12, 12)),
    ("stars", (9, 10, 10)),
]
ENGINES = [
    ("torch", "gather", None),
    ("torch", "sparse", None),
    ("torch", "gather", 1.25),
    ("torch", "sparse", 2.0),
    ("torch", "binned", None),
    ("torch", "binned", 2.0),
    pytest.param(
        "finufft",
        "auto",
        None,
        marks=pytest.mark.skipif(not HAS_FINUFFT, reason="finufft is not installed"),
    ),
]
ACCURACY = [
    (torch.complex64, 1e-2),
    (torch.complex64, 1e-3),
    (torch.complex64, 1e-4),
    (torch.complex128, 1e-6),
    (torch.complex128, 1e-9),
]


@pytest.mark.parametrize(
    "kind,im_size", CASES, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in CASES]
)
@pytest.mark.parametrize("backend,method,sigma", ENGINES)
@pytest.mark.parametrize("dtype,eps", ACCURACY, ids=[f"{str(d)[6:]}-{e:g}" for d, e in ACCURACY])
def test_forward_adjoint_accuracy(kind, im_size, backend, method, sigma, dtype, eps, device):
    if backend == "finufft" and device != "cpu":
        pytest.skip("finufft runs on the CPU")
    traj, e = problem(kind, im_size)
    try:
        op = nufft.plan(
            traj,
            im_size,
            eps=eps,
            dtype=dtype,
            backend=backend,
            method=method,
            oversampling=sigma,
            normal="direct",
            device=device,
        )
    except ParameterError as exc:
        # a forced low σ cannot reach very small ε with W ≤ 16: the plan must say so
        assert sigma is not None and sigma < 2 and eps <= 1e-9, exc
        assert "no NUFFT configuration reaches" in str(exc)
        return
    x = crandn((2, *im_size), dtype, seed=1, device=device)
    y = crandn((2, traj.shape[0]), dtype, seed=2, device=device)
    fwd = op(x).cpu().numpy()
    adj = op.H(y).cpu().numpy()
    xn = x.cpu().numpy().astype(np.complex128).reshape(2, -1)
    yn = y.cpu().numpy().astype(np.complex128)
    ref_f = xn @ e.T
    ref_a = (yn @ e.conj()).reshape(2, *im_size)
    err_f, err_a = rel(fwd, ref_f), rel(adj, ref_a)
    assert err_f <= eps, f"forward error {err_f:.2e} > eps {eps:g} ({op.info})"
    assert err_a <= eps, f"adjoint error {err_a:.2e} > eps {eps:g} ({op.info})"
    if backend == "torch":
        # the estimate is conservative: achieved ≤ expected ≤ eps
        assert max(err_f, err_a) <= op.info.expected_error * 1.5 + 1e-6
    assert fwd.dtype == (np.complex64 if dtype == torch.complex64 else np.complex128)


@pytest.mark.parametrize("n", [15, 16])
def test_odd_even_1d_exact_low_eps(n):
    """Odd and even sizes, complex128 to 1e-12 with σ = 2 (W = 13–16)."""
    rng = np.random.default_rng(n)
    traj = rng.uniform(-0.5, 0.5, (100, 1))
    e = ndft_matrix(traj, (n,))
    op = nufft.plan(traj, n, eps=1e-12, dtype=torch.complex128, backend="torch", oversampling=2)
    x = crandn((n,), torch.complex128, seed=3)
    assert rel(op(x).numpy(), e @ x.numpy()) <= 1e-12


def test_edge_sample_half_wraps():
    """k = +0.5 is accepted and equals k = −0.5 (periodicity)."""
    x = crandn((8, 8), torch.complex128, seed=4)
    a = nufft.plan(
        np.array([[0.5, 0.1]]), (8, 8), eps=1e-9, dtype=torch.complex128, backend="torch"
    )
    b = nufft.plan(
        np.array([[-0.5, 0.1]]), (8, 8), eps=1e-9, dtype=torch.complex128, backend="torch"
    )
    assert rel(a(x).numpy(), b(x).numpy()) < 1e-9


@pytest.mark.skipif(not HAS_FINUFFT, reason="finufft (the complex128 reference) is not installed")
@pytest.mark.parametrize("method", ["gather", "sparse", "binned"])
def test_complex64_reaches_1e6_on_dense_radial(method):
    """ε = 1e-6 in complex64: spreading sums in float64 (float32 sums floored at 1.5e-6)."""
    import finufft

    n = 128
    traj = nufft.radial(201, 2 * n)
    pts = [2 * np.pi * traj[:, i].numpy() for i in range(2)]
    op = nufft.plan(
        traj, (n, n), eps=1e-6, backend="torch", method=method, normal="direct", oversampling=1.5
    )
    x = crandn((n, n), seed=5)
    y = crandn((traj.shape[0],), seed=6)
    yref = finufft.nufft2d2(*pts, x.numpy().astype(np.complex128), eps=1e-12, isign=-1)
    xref = finufft.nufft2d1(*pts, y.numpy().astype(np.complex128), (n, n), eps=1e-12, isign=1)
    assert rel(op(x).numpy(), yref) <= 1e-6
    assert rel(op.H(y).numpy(), xref) <= 1e-6
