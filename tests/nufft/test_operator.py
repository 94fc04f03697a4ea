"""Operator behaviour: dot test, batching, per-batch trajectories, Toeplitz normal, autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nufft_testutils import crandn, ndft_matrix, rel

from qmrkit import nufft
from qmrkit._optional import available
from qmrkit.ops import LinearOperator, check_adjoint

HAS_FINUFFT = available("finufft")
BACKENDS = [
    ("torch", "gather"),
    ("torch", "sparse"),
    ("torch", "binned"),
    pytest.param(
        "finufft",
        "auto",
        marks=pytest.mark.skipif(not HAS_FINUFFT, reason="finufft is not installed"),
    ),
]


def _traj(nd, m=300, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (m, nd))


@pytest.mark.parametrize("backend,method", BACKENDS)
@pytest.mark.parametrize("im_size", [(17,), (16, 15), (8, 9, 10)])
def test_dot_test(backend, method, im_size, device):
    if backend == "finufft" and device != "cpu":
        pytest.skip("finufft runs on the CPU")
    op = nufft.plan(
        _traj(len(im_size)), im_size, eps=1e-3, backend=backend, method=method, device=device
    )
    assert isinstance(op, LinearOperator)
    assert check_adjoint(op, batch=(3,), device=device) <= 1e-6
    assert check_adjoint(op, device=device) <= 1e-6


@pytest.mark.parametrize("backend,method", BACKENDS)
def test_batch_dims_broadcast(backend, method, device):
    if backend == "finufft" and device != "cpu":
        pytest.skip("finufft runs on the CPU")
    op = nufft.plan(_traj(2), (12, 12), eps=1e-4, backend=backend, method=method, device=device)
    x = crandn((2, 3, 12, 12), seed=1, device=device)
    y = op(x)
    assert y.shape == (2, 3, 300)
    for i in range(2):
        for j in range(3):
            assert rel(y[i, j].cpu(), op(x[i, j]).cpu()) < 1e-6
    assert op.H(y).shape == (2, 3, 12, 12)
    assert op.adjoint(y[0, 0]).shape == (12, 12)


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "finufft", marks=pytest.mark.skipif(not HAS_FINUFFT, reason="finufft is not installed")
        ),
    ],
)
def test_per_batch_trajectories(backend):
    """traj (T, M, d): frame t uses trajectory t; extra leading dims broadcast."""
    trajs = np.stack([_traj(2, 200, seed=s) for s in range(3)])
    op = nufft.plan(trajs, (10, 10), eps=1e-6, dtype=torch.complex128, backend=backend)
    x = crandn((2, 3, 10, 10), torch.complex128, seed=2)
    y = op(x)
    assert y.shape == (2, 3, 200)
    for t in range(3):
        e = ndft_matrix(trajs[t], (10, 10))
        assert rel(y[:, t].numpy(), x[:, t].reshape(2, -1).numpy() @ e.T) < 1e-6
    assert check_adjoint(op, batch=(3,), dtype=torch.complex128) < 1e-12
    with pytest.raises(nufft_errors().ShapeError, match="must end in"):
        op(crandn((2, 10, 10), torch.complex128))


def nufft_errors():
    import qmrkit.errors

    return qmrkit.errors


@pytest.mark.parametrize("backend,method", BACKENDS)
@pytest.mark.parametrize(
    "im_size,eps,dtype",
    [
        ((20, 17), 1e-3, torch.complex64),
        ((15,), 1e-4, torch.complex64),
        ((8, 9, 7), 1e-6, torch.complex128),
    ],
)
def test_toeplitz_matches_adjoint_forward(backend, method, im_size, eps, dtype, device):
    if backend == "finufft" and device != "cpu":
        pytest.skip("finufft runs on the CPU")
    kw = dict(eps=eps, dtype=dtype, backend=backend, method=method, device=device)
    traj = _traj(len(im_size), 500, seed=3)
    top = nufft.plan(traj, im_size, normal="toeplitz", **kw)
    dop = nufft.plan(traj, im_size, normal="direct", **kw)
    assert top.info.normal == "toeplitz" and dop.info.normal == "direct"
    x = crandn((2, *im_size), dtype, seed=4, device=device)
    ref = dop.H(dop(x))
    assert rel(top.normal(x).cpu(), ref.cpu()) <= eps
    # and against the exact normal operator
    e = ndft_matrix(traj, im_size)
    exact = (x.cpu().numpy().reshape(2, -1).astype(np.complex128) @ e.T) @ e.conj()
    assert rel(top.N(x).cpu().numpy().reshape(2, -1), exact) <= eps


def test_toeplitz_per_batch_trajectories():
    trajs = np.stack([_traj(2, 150, seed=s) for s in range(2)])
    op = nufft.plan(
        trajs, (9, 10), eps=1e-6, dtype=torch.complex128, normal="toeplitz", backend="torch"
    )
    x = crandn((4, 2, 9, 10), torch.complex128, seed=5)
    assert rel(op.normal(x), op.H(op(x))) < 1e-6


@pytest.mark.parametrize("backend,method", BACKENDS)
@pytest.mark.parametrize("im_size", [(7,), (5, 6)])
def test_gradcheck(backend, method, im_size):
    """The gradient of forward is the adjoint (and vice versa): gradcheck in complex128."""
    op = nufft.plan(
        _traj(len(im_size), 20, seed=6),
        im_size,
        eps=1e-9,
        dtype=torch.complex128,
        backend=backend,
        method=method,
        normal="direct",
    )
    x = crandn(im_size, torch.complex128, seed=7).requires_grad_()
    y = crandn((20,), torch.complex128, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(op.forward, (x,), eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradcheck(op.adjoint, (y,), eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradcheck(op.normal, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_toeplitz_normal():
    op = nufft.plan(
        _traj(2, 30, seed=9),
        (5, 6),
        eps=1e-9,
        dtype=torch.complex128,
        backend="torch",
        normal="toeplitz",
    )
    x = crandn((5, 6), torch.complex128, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(op.normal, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradient_in_a_loss_float32():
    """A least-squares loss through forward: grad = Aᴴ(Ax − y) (complex64, the common case)."""
    op = nufft.plan(_traj(2, 400, seed=11), (16, 16), eps=1e-4, backend="torch")
    y = crandn((400,), seed=12)
    x = crandn((16, 16), seed=13).requires_grad_()
    loss = 0.5 * (op(x) - y).abs().pow(2).sum()
    loss.backward()
    expect = op.H(op(x.detach()) - y)
    assert rel(x.grad, expect) < 1e-5


def test_repr_and_info():
    op = nufft.plan(_traj(2), (16, 16), eps=1e-3)
    text = repr(op)
    assert "NufftPlan" in text and "W=" in text
    i = op.info
    assert i.eps == 1e-3 and i.kernel_width >= 2 and len(i.grid_size) == 2
    assert i.expected_error <= 1e-3
    assert i.reason


def test_toeplitz_complex64_keeps_precision_at_scale():
    """The PSF is computed in float64: a float32 PSF cost 3e-4 at 256² (dynamic range t(0)=M)."""
    traj = nufft.radial(160, 192)
    x = crandn((96, 96), torch.complex128, seed=14)
    ref = nufft.plan(traj, (96, 96), eps=1e-9, dtype=torch.complex128, normal="direct")
    top = nufft.plan(traj, (96, 96), eps=1e-6, normal="toeplitz")
    exact = ref.H(ref(x))
    assert rel(top.normal(x.to(torch.complex64)).to(torch.complex128), exact) < 1e-5
