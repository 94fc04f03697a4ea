"""CG-SENSE (Cartesian): exactness against dense least squares, accuracy on simulated data
justified by the g-factor, batching, devices and bad input."""

import math

import numpy as np
import pytest
import torch

from qmrkit import recon
from qmrkit.errors import ParameterError, ShapeError
from qmrkit.sim import cartesian_mask

from ._helpers import align_phase, cfft, noise_like, nrmse, phantom, sense_g_factor


def _dense_matrix(maps, mask):
    """Explicit encoding matrix E (rows: sampled (coil, k) entries, cols: pixels)."""
    n_c, ny, nx = maps.shape
    eye = torch.eye(ny * nx, dtype=maps.dtype).reshape(ny * nx, ny, nx)
    cols = cfft(maps[None] * eye[:, None])  # (pixels, C, ny, nx)
    sel = mask.expand(n_c, ny, nx)
    return cols[:, sel].T.numpy()  # (n_sampled, pixels)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.complex128, 1e-10), (torch.complex64, 1e-5)])
def test_cg_sense_equals_dense_least_squares(dtype, tol):
    """CG-SENSE solves min‖Ex − y‖ exactly: compare with numpy's lstsq on the explicit matrix."""
    ny, nx, n_c = 12, 10, 4
    _, maps, _ = phantom(12, n_c, dtype=dtype)
    maps = maps[:, :, 1:11].contiguous()
    mask = cartesian_mask((ny, nx), 2, calib=2)
    g = torch.Generator().manual_seed(0)
    y = (
        torch.complex(
            torch.randn(n_c, ny, nx, generator=g, dtype=torch.float64),
            torch.randn(n_c, ny, nx, generator=g, dtype=torch.float64),
        ).to(dtype)
        * mask
    )
    e = _dense_matrix(maps, mask)
    x_ref = np.linalg.lstsq(
        e.astype(np.complex128),
        y[mask.expand(n_c, ny, nx)].numpy().astype(np.complex128),
        rcond=None,
    )[0].reshape(ny, nx)
    res = recon.sense(y, maps, mask=mask, max_iter=200, tol=tol * 1e-2)
    err = np.linalg.norm(res.image.numpy() - x_ref) / np.linalg.norm(x_ref)
    assert err <= tol
    assert res.image.dtype == dtype and res.method == "sense"
    assert res.residual_history and res.elapsed_s > 0


def test_cg_sense_r4_calibration_accuracy_from_g_factor():
    """8 coils, uniform R = 4 along y with 16 calibration lines, complex Gaussian noise σ.

    Justification of the threshold: with orthonormal FFTs and maps normalised to Σ|S|² = 1, the
    fully sampled coil-combined image has noise σ per pixel; SENSE at acceleration R amplifies it
    to σ·g·√R (Pruessmann 1999). The analytic g-factor of *uniform* R = 4 (no calibration lines)
    is an upper bound here (the extra calibration lines only lower the noise), so the expected
    noise NRMSE is at most  σ·sqrt(R·Σ g²)/‖x‖ (≈ 0.17 here: this ring of 8 coils has a mean
    g ≈ 9 inside the object at R = 4 along one axis). The threshold allows 1.2× that plus 0.03 for
    the truncation of CG at 50 iterations (noise-free, the same reconstruction reaches 0.019: the
    high g-factor makes the system ill-conditioned and CG slow in the aliased directions).
    """
    n, r = 64, 4
    x, maps, _ = phantom(n, 8)
    full = cfft(maps * x)
    sigma = 1e-3 * float(full.abs().max())
    mask = cartesian_mask((n, n), r, calib=16)
    y = (full + noise_like(full, sigma)) * mask
    res = recon.sense(y, maps, mask=mask, max_iter=50, tol=1e-7)
    g = sense_g_factor(maps, r)
    bound = sigma * math.sqrt(r * float((g**2).sum())) / float(x.abs().norm())
    err = nrmse(res.image, x)
    assert err < 1.2 * bound + 0.03, (err, bound)
    # and it is a real reconstruction: much better than the zero-filled coil combination
    zf = (maps.conj() * cfft(y, inverse=True)).sum(0)
    assert err < 0.5 * nrmse(zf, x)
    # noise-free: close to exact
    clean = recon.sense(full * mask, maps, mask=mask, max_iter=50, tol=1e-7)
    assert nrmse(clean.image, x) < 0.03


def test_cg_sense_with_espirit_maps():
    """End to end with estimated maps: ESPIRiT from the calibration region, then CG-SENSE;
    NRMSE against the truth (up to a global phase) below the g-factor bound of the test above
    plus 0.02 for map errors at the object edge."""
    n, r = 64, 4
    x, maps, _ = phantom(n, 8)
    full = cfft(maps * x)
    sigma = 1e-3 * float(full.abs().max())
    mask = cartesian_mask((n, n), r, calib=20)
    y = (full + noise_like(full, sigma)) * mask
    est = recon.espirit(y, calib=20)
    res = recon.sense(y, est, mask=mask, max_iter=50, tol=1e-7)
    g = sense_g_factor(maps, r)
    bound = sigma * math.sqrt(r * float((g**2).sum())) / float(x.abs().norm())
    assert nrmse(align_phase(res.image, x), x) < 1.2 * bound + 0.03


def test_cg_sense_batched_frames_and_tikhonov(device):
    x, maps, _ = phantom(32, 4, device=device)
    mask = cartesian_mask((32, 32), 2, calib=8, device=device)
    frames = torch.stack([x, 0.5 * x.flip(-1), 2 * x])  # (3, ny, nx)
    y = cfft(maps * frames[:, None]) * mask  # (3, C, ny, nx)
    res = recon.sense(y, maps, mask=mask, max_iter=60, tol=1e-8)
    assert res.image.shape == (3, 32, 32) and res.image.device.type == device.type
    for t in range(3):
        one = recon.sense(y[t], maps, mask=mask, max_iter=60, tol=1e-8)
        torch.testing.assert_close(
            res.image[t], one.image, atol=2e-4 * float(one.image.abs().max()), rtol=0
        )
    # Tikhonov shrinks the solution
    reg = recon.sense(y[0], maps, mask=mask, lam=0.5, max_iter=60, tol=1e-8)
    assert reg.image.norm() < 0.9 * res.image[0].norm()
    assert reg.settings["lam_absolute"] > 0


def test_cg_sense_3d_caipi():
    n = 24
    x, maps, _ = phantom(n, 8, ndim=3)
    mask = cartesian_mask((n, n, n), (2, 2), calib=8, kind="caipi")
    y = cfft(maps * x, axes=(-3, -2, -1)) * mask
    res = recon.sense(y, maps, mask=mask, max_iter=40, tol=1e-7)
    assert res.image.shape == (n, n, n)
    assert nrmse(res.image, x) < 0.01


def test_bad_input():
    x, maps, _ = phantom(32, 4)
    mask = cartesian_mask((32, 32), 2, calib=8)
    y = cfft(maps * x) * mask
    with pytest.raises(ShapeError, match="4 coils but kdata has 3"):
        recon.sense(y[:3], maps, mask=mask)
    with pytest.raises(ShapeError, match="spatial"):
        recon.sense(y[..., :30], maps, mask=mask)
    with pytest.raises(ShapeError, match="does not broadcast"):
        recon.sense(y, maps, mask=mask[:16])
    with pytest.raises(ParameterError, match="samples nothing"):
        recon.sense(y, maps, mask=torch.zeros(32, 32, dtype=torch.bool))
    with pytest.raises(ParameterError, match="lam"):
        recon.sense(y, maps, mask=mask, lam=-1)
    with pytest.raises(ShapeError):
        recon.sense(y, maps[0], mask=mask)


def test_hybrid_readout_equals_full_operator():
    """With a fully sampled readout, sense() drops the readout FFT (hybrid x-ky space); the
    solution equals CG on the full Mask·FFT·Sense operator. A mask varying along the readout
    keeps the full operator."""
    from qmrkit import optim

    x, maps, _ = phantom(32, 4, dtype=torch.complex128)
    mask = cartesian_mask((32, 32), 3, calib=6)
    y = cfft(maps * x) * mask
    res = recon.sense(y, maps, mask=mask, max_iter=25, tol=0)
    assert res.settings["hybrid_readout"] is True
    A = recon.operator(maps, mask=mask)
    ref = optim.cg(A, A.H(y), max_iter=25, tol=0).x
    torch.testing.assert_close(res.image, ref, atol=1e-10, rtol=1e-8)
    rnd = torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < 0.5
    res2 = recon.sense(y * rnd, maps, mask=rnd, max_iter=5, tol=0)
    assert res2.settings["hybrid_readout"] is False
