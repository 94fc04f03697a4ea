"""The fused Cartesian SENSE operator and the cached ‖AᴴA‖ of CG-SENSE with λ > 0."""

import importlib

import pytest
import torch

from qmrkit import recon
from qmrkit.ops import FFT, Mask, Sense
from qmrkit.recon._ops import CartesianSense, cartesian_operator
from qmrkit.sim import cartesian_mask

from ._helpers import cfft, phantom

sense_mod = importlib.import_module("qmrkit.recon.sense")  # the module (recon.sense: function)


def _crandn(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("spatial", "axes", "mask_shape"),
    [
        ((6, 8), (-2, -1), (6, 8)),
        ((4, 6, 10), (-3, -2, -1), (4, 6, 10)),
        ((10, 4, 6), (-2, -1), (1, 4, 6)),  # hybrid readout-first: FFT over the last two axes
        ((8, 12), (-2,), (8, 1)),
    ],
)
def test_fused_operator_equals_composition_and_centred_dft(spatial, axes, mask_shape):
    """Forward, adjoint and normal equal Mask·FFT·Sense; the forward equals the centred DFT of
    the coil images (fftshift∘fftn∘ifftshift, written out), and the adjoint passes the dot test."""
    n_c = 3
    maps = _crandn((n_c, *spatial), 0)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(1)) > 0.4
    A = CartesianSense(maps, mask, axes)
    B = Mask(mask, shape=(n_c, *spatial)) @ FFT((n_c, *spatial), axes=axes) @ Sense(maps)
    x = _crandn((2, *spatial), 2)
    y = _crandn((2, n_c, *spatial), 3)
    ref = cfft(maps * x[:, None], axes=axes) * mask
    torch.testing.assert_close(A(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A(x), B(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.H(y), B.H(y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.N(x), B.H(B(x)), rtol=1e-12, atol=1e-12)
    lhs = torch.vdot(A(x).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), A.H(y).flatten())
    assert abs(complex(lhs - rhs)) < 1e-10 * abs(complex(lhs))


def test_odd_sizes_keep_the_composition():
    """The checkerboard identity needs even FFT axes: odd sizes build Mask·FFT·Sense."""
    maps = _crandn((2, 7, 8), 0).to(torch.complex64)
    op, _ = cartesian_operator(maps, torch.ones(7, 8), torch.zeros(2, 7, 8, dtype=torch.complex64))
    assert not isinstance(op, CartesianSense)
    op, _ = cartesian_operator(
        maps[:, :6], torch.ones(6, 8), torch.zeros(2, 6, 8, dtype=torch.complex64)
    )
    assert isinstance(op, CartesianSense)


def test_fused_operator_gradient_matches_composition():
    maps = _crandn((2, 6, 8), 0)
    mask = torch.rand((6, 8), generator=torch.Generator().manual_seed(1)) > 0.5
    A = CartesianSense(maps, mask, (-2, -1))
    B = Mask(mask, shape=(2, 6, 8)) @ FFT((2, 6, 8)) @ Sense(maps)
    grads = []
    for op in (A, B):
        x = _crandn((6, 8), 2).requires_grad_(True)
        op.N(x).abs().pow(2).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_lambda_norm_is_cached_by_content(monkeypatch):
    """λ > 0 runs the Lanczos estimate once per (maps, mask); equal content (a fresh copy) hits
    the cache with the identical λ_abs and image; other maps miss."""
    x, maps, _ = phantom(32, 4)
    mask = cartesian_mask((32, 32), 2, calib=8)
    y = cfft(maps * x) * mask
    calls = []
    real = sense_mod._lanczos_norm2
    monkeypatch.setattr(
        sense_mod, "_lanczos_norm2", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    sense_mod._NORM2_CACHE.clear()
    a = recon.sense(y, maps, mask=mask, lam=0.05, max_iter=10, tol=0)
    b = recon.sense(y * 2, maps.clone(), mask=mask.clone(), lam=0.05, max_iter=10, tol=0)
    assert len(calls) == 1
    assert a.settings["lam_absolute"] == b.settings["lam_absolute"] > 0
    torch.testing.assert_close(2 * a.image, b.image, rtol=1e-5, atol=1e-6)
    # the value equals an uncached estimate on the same operator
    sense_mod._NORM2_CACHE.clear()
    c = recon.sense(y, maps, mask=mask, lam=0.05, max_iter=10, tol=0)
    assert len(calls) == 2 and c.settings["lam_absolute"] == a.settings["lam_absolute"]
    recon.sense(y, maps * 1.5, mask=mask, lam=0.05, max_iter=10, tol=0)
    assert len(calls) == 3
