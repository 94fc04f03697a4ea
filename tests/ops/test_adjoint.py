"""Dot test and autograd for every concrete operator (complex64, batched, every device)."""

import pytest
import torch

from qmrkit.ops import (
    FFT,
    Diagonal,
    FiniteDifference,
    Identity,
    Mask,
    Matrix,
    Reshape,
    Sense,
    Vstack,
    check_adjoint,
)


def _c(shape, seed, dtype=torch.complex64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def _mask(shape, seed, p=0.4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def _sense_recon(dtype):
    maps = _c((4, 12, 10), 3, dtype)
    shape = (4, 12, 10)
    return Mask(_mask((12, 1), 4), shape=shape) @ FFT(shape, axes=(-2, -1)) @ Sense(maps)


OPERATORS = {
    "fft2": lambda dt: FFT((12, 10)),
    "fft3-odd": lambda dt: FFT((5, 7, 9)),
    "fft-axes": lambda dt: FFT((6, 8, 5), axes=(0, 2)),
    "fft-uncentred-backward": lambda dt: FFT((8, 6), centred=False, norm="backward"),
    "fft-forward": lambda dt: FFT((7, 6), norm="forward"),
    "mask": lambda dt: Mask(_mask((12, 10), 1)),
    "mask-lines": lambda dt: Mask(_mask((12, 1), 2), shape=(12, 10)),
    "sense2d": lambda dt: Sense(_c((4, 12, 10), 3, dt)),
    "sense3d-coil-last": lambda dt: Sense(_c((6, 5, 4, 3), 3, dt), coil_axis=-1),
    "sense-two-sets": lambda dt: Sense(_c((2, 4, 12, 10), 3, dt), coil_axis=1, set_axis=0),
    "fd2-periodic": lambda dt: FiniteDifference((12, 10)),
    "fd3-neumann": lambda dt: FiniteDifference((5, 6, 7), boundary="neumann"),
    "fd-time-voxel": lambda dt: FiniteDifference(
        (4, 6, 5), axes=(0, 1, 2), voxel_size=(1.0, 0.7, 1.3), boundary="neumann"
    ),
    "diagonal-complex": lambda dt: Diagonal(_c((12, 10), 5, dt)),
    "diagonal-real-broadcast": lambda dt: Diagonal(torch.rand(1, 10), shape=(12, 10)),
    "matrix": lambda dt: Matrix(_c((7, 4), 6, dt)),
    "reshape": lambda dt: Reshape((4, 6), (3, 8)),
    "identity": lambda dt: Identity((5, 3)),
    "sense-recon": _sense_recon,
    "adjoint-of-sense": lambda dt: Sense(_c((3, 8, 6), 7, dt)).H,
    "scaled-fd": lambda dt: 0.5 * FiniteDifference((8, 6)),
    "vstack-tv-recon": lambda dt: Vstack([_sense_recon(dt), FiniteDifference((12, 10))]),
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
@pytest.mark.parametrize("batch", [(), (2,)])
def test_dot_test_complex64(name, batch, device):
    op = OPERATORS[name](torch.complex64)
    err = check_adjoint(op, batch=batch, dtype=torch.complex64, device=device)
    assert err <= 1e-5, f"{name}: dot-test relative error {err:.2e}"


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_dot_test_complex128(name, device):
    op = OPERATORS[name](torch.complex128)
    err = check_adjoint(op, batch=(2,), dtype=torch.complex128, device=device)
    assert err <= 1e-12, f"{name}: dot-test relative error {err:.2e}"


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_shapes_and_batching(name, device):
    """Batched application equals applying the operator to each batch element."""
    op = OPERATORS[name](torch.complex64)
    x = _c((3, *op.ishape), 11).to(device)
    y = op(x)
    assert y.shape == (3, *op.oshape)
    for i in range(3):
        torch.testing.assert_close(y[i], op(x[i]), rtol=1e-5, atol=1e-5)
    assert op.H(y).shape == x.shape


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_normal_matches_adjoint_of_forward(name, device):
    op = OPERATORS[name](torch.complex64)
    x = _c((2, *op.ishape), 12).to(device)
    torch.testing.assert_close(op.N(x), op.H(op(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_autograd_gradient_is_adjoint(name, device):
    """d‖Ax‖²/dx̄ (PyTorch's convention for complex x) equals 2 AᴴA x."""
    op = OPERATORS[name](torch.complex128)
    x = _c(op.ishape, 13, torch.complex128).to(device).requires_grad_(True)
    loss = op(x).abs().pow(2).sum()
    (g,) = torch.autograd.grad(loss, x)
    expected = 2 * op.H(op(x.detach()))
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-10)


class _OpaqueFFT(FFT):
    """An FFT that claims autograd cannot trace it (as an external library would)."""

    autograd_safe = False


def test_autograd_through_opaque_operator(device):
    op = _OpaqueFFT((3, 6, 5), axes=(-2, -1)) @ Sense(_c((3, 6, 5), 1, torch.complex128))
    x = _c((6, 5), 2, torch.complex128).to(device).requires_grad_(True)
    (g,) = torch.autograd.grad(op(x).abs().pow(2).sum(), x)
    torch.testing.assert_close(g, 2 * op.H(op(x.detach())), rtol=1e-10, atol=1e-10)


def test_operator_data_follows_input_device_and_dtype(device):
    """Operators built on CPU apply to data on any device and keep the input precision."""
    S = Sense(_c((3, 6, 5), 1))
    x = _c((6, 5), 2, torch.complex128).to(device)
    y = S(x)
    assert y.device.type == device.type and y.dtype == torch.complex128
    m = Mask(_mask((6, 5), 3))
    assert m(x).dtype == torch.complex128


def test_vstack_with_an_opaque_block_is_differentiable(device):
    op = Vstack([_OpaqueFFT((6, 5)), FiniteDifference((6, 5))])
    assert not op.autograd_safe
    x = _c((2, 6, 5), 3, torch.complex128).to(device).requires_grad_(True)
    (g,) = torch.autograd.grad(op(x).abs().pow(2).sum(), x)
    torch.testing.assert_close(g, 2 * op.N(x.detach()), rtol=1e-10, atol=1e-10)
