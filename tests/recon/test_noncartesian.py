"""Non-Cartesian SENSE, gridding, TV by PDHG and the gradient-descent (sgd) route."""

import math
import warnings

import pytest
import torch

from qmrkit import fit, nufft, recon
from qmrkit.errors import ParameterError, QmrkitWarning, ShapeError
from qmrkit.sim import cartesian_mask

from ._helpers import cfft, noise_like, nrmse, phantom


def _disk_limited(x):
    """The part of an image that a radial trajectory can encode: k-space inside |k| ≤ 0.5
    (the corners of the Cartesian k-space square are never sampled by radial spokes)."""
    n = x.shape[-1]
    k = torch.arange(n) - n // 2
    disk = torch.sqrt(k[:, None] ** 2 + k[None] ** 2) / n <= 0.5
    return cfft(cfft(x) * disk, inverse=True)


def _radial_data(n=64, n_spokes=50, sigma_rel=2e-3, seed=1):
    x, maps, obj = phantom(n, 8)
    xd = _disk_limited(x)
    traj = nufft.golden_angle_radial(n_spokes, 2 * n).to(torch.float32)
    op = nufft.plan(traj, (n, n), eps=1e-6, oversampling=2.0)
    y = op(maps * xd)
    sigma = sigma_rel * float(y.abs().max())
    return xd, maps, traj, y, sigma, noise_like(y, sigma, seed=seed)


@pytest.mark.slow
def test_radial_cg_sense_accuracy():
    """8 coils, 64², 50 golden-angle spokes (angular undersampling R = π/2·64/50 ≈ 2.0 at the
    k-space edge), complex noise σ = 2e-3·max|y|, 40 CG iterations.

    Justification of the threshold. Radial SENSE has no closed-form g-factor, so the noise
    amplification is measured by the pseudo-replica method (Robson et al., MRM 2008): the same
    reconstruction of a second, independent noise-only data set gives the noise part of the error
    (CG is nearly linear in the data at a fixed iteration count). The noise-free reconstruction
    of this sampling reaches an NRMSE of 0.037 against the k-space-disk-limited truth (the part
    radial spokes encode) at 40 iterations; the budget for it is 0.05. The errors add in quadrature
    (independent), with 20% margin.
    """
    xd, maps, traj, y, sigma, noise = _radial_data()
    res = recon.sense(y + noise, maps, traj=traj, max_iter=40, tol=0)
    replica = recon.sense(noise_like(y, sigma, seed=7), maps, traj=traj, max_iter=40, tol=0)
    noise_part = float(replica.image.norm() / xd.norm())
    err = nrmse(res.image, xd)
    assert err < 1.2 * math.hypot(noise_part, 0.05), (err, noise_part)
    assert res.settings["kind"] == "non-cartesian" and res.iterations == 40


def test_radial_sense_toeplitz_equals_direct():
    xd, maps, traj, y, _, _ = _radial_data(n=32, n_spokes=30)
    a = recon.sense(y, maps, traj=traj, max_iter=15, tol=0, normal="toeplitz", eps=1e-6)
    b = recon.sense(y, maps, traj=traj, max_iter=15, tol=0, normal="direct", eps=1e-6)
    assert a.settings["nufft_normal"] == "toeplitz" and b.settings["nufft_normal"] == "direct"
    assert nrmse(a.image, b.image) < 1e-3


def test_radial_sense_batched_frames():
    xd, maps, traj, y, _, _ = _radial_data(n=32, n_spokes=40)
    yb = torch.stack([y, 2 * y])
    res = recon.sense(yb, maps, traj=traj, max_iter=20, tol=0)
    assert res.image.shape == (2, 32, 32)
    assert nrmse(res.image[1], 2 * res.image[0]) < 1e-4


def test_gridding_with_and_without_dcf():
    n = 64
    x, maps, _ = phantom(n, 8)
    traj = nufft.radial(201, 2 * n).to(torch.float32)  # fully sampled (π/2·64 ≈ 101 spokes)
    y = nufft.plan(traj, (n, n))(maps * _disk_limited(x))
    with pytest.warns(QmrkitWarning, match="density compensation"):
        g = recon.gridding(y, traj, maps=maps)
    # gridding is an approximate inverse: a few per cent on a fully sampled trajectory
    assert nrmse(g.image, _disk_limited(x)) < 0.1
    dcf = nufft.density_compensation(traj, (n, n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g2 = recon.gridding(y, traj, dcf, maps)
    torch.testing.assert_close(g2.image, g.image)
    rss_img = recon.gridding(y, traj, dcf, im_size=(n, n))
    assert not rss_img.image.is_complex()
    # RSS is positive everywhere, so the gridding ripples in the background add up (no cancelling)
    assert nrmse(rss_img.image, _disk_limited(x).abs()) < 0.25
    with pytest.raises(ParameterError, match="im_size"):
        recon.gridding(y, traj, dcf)
    with pytest.raises(ShapeError, match="coils"):
        recon.gridding(y[:3], traj, dcf, maps)


def test_bad_trajectory_input():
    xd, maps, traj, y, _, _ = _radial_data(n=32, n_spokes=20)
    with pytest.raises(ShapeError, match="samples"):
        recon.sense(y[:, :-5], maps, traj=traj)
    with pytest.raises(ShapeError, match="coils"):
        recon.sense(y, maps[:4], traj=traj)
    with pytest.raises(ShapeError, match="dimensions"):
        recon.sense(y, maps, traj=torch.zeros(traj.shape[0], 3))


@pytest.mark.slow
def test_tv_beats_cg_sense_at_high_acceleration():
    """Cartesian R = 8 (12 calibration lines, g-factor in the tens) with noise σ = 1e-2·max|k|:
    CG-SENSE amplifies the noise enormously; TV by PDHG must lower the NRMSE substantially.
    The same holds for radial sampling with 20 spokes (R ≈ 5)."""
    n = 64
    x, maps, _ = phantom(n, 8)
    full = cfft(maps * x)
    mask = cartesian_mask((n, n), 8, calib=12)
    y = (full + noise_like(full, 1e-2 * float(full.abs().max()))) * mask
    cg = recon.sense(y, maps, mask=mask, max_iter=30, tol=0)
    tvr = recon.tv(y, maps, mask=mask, lam=1e-2, max_iter=150)
    e_cg, e_tv = nrmse(cg.image, x), nrmse(tvr.image, x)
    assert e_tv < 0.5 * e_cg and e_tv < 0.3, (e_tv, e_cg)
    assert tvr.method == "tv" and len(tvr.residual_history) == tvr.iterations

    xd, maps, traj, yr, _, noise = _radial_data(n=64, n_spokes=20, sigma_rel=2e-3)
    cg = recon.sense(yr + noise, maps, traj=traj, max_iter=30, tol=0)
    tvr = recon.tv(yr + noise, maps, traj=traj, lam=3e-3, max_iter=200)
    assert nrmse(tvr.image, xd) < nrmse(cg.image, xd) - 0.02


def test_tv_temporal_frames():
    n = 32
    x, maps, _ = phantom(n, 4)
    frames = torch.stack([x * (1 + 0.1 * t) for t in range(4)])
    masks = [cartesian_mask((n, n), 4, calib=4) for _ in range(4)]
    y = cfft(maps * frames[:, None]) * masks[0]
    res = recon.tv(y, maps, mask=masks[0], lam=1e-3, dims=(0, 1, 2), max_iter=60)
    assert res.image.shape == (4, n, n)
    assert res.settings["dims"] == [0, 1, 2]
    with pytest.raises(ParameterError):
        recon.tv(y, maps, mask=masks[0], lam=-1)


@pytest.mark.slow
def test_sgd_matches_least_squares_and_tv_helps():
    n = 32
    x, maps, _ = phantom(n, 8)
    mask = cartesian_mask((n, n), 2, calib=8)
    A = recon.operator(maps, mask=mask)
    y = A(x)
    ref = recon.sense(y, maps, mask=mask, max_iter=100, tol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = recon.sgd(A, y, loss="l2", lr=0.02, max_iter=800)
    assert res.method == "sgd" and res.objective_history[-1] < res.objective_history[0]
    assert nrmse(res.image, ref.image) < 0.03
    # noisy, strongly undersampled: TV through the fitting engine's regulariser helps
    mask8 = cartesian_mask((n, n), 6, calib=6)
    A8 = recon.operator(maps, mask=mask8)
    full = cfft(maps * x)
    y8 = (full + noise_like(full, 1e-2 * float(full.abs().max()))) * mask8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = recon.sgd(A8, y8, loss="l1", lr=0.02, max_iter=300)
        reg = recon.sgd(
            A8,
            y8,
            loss="l1",
            lr=0.02,
            max_iter=300,
            regularizers=[fit.TotalVariation(("real", "imag"), 3e-3)],
        )
    assert nrmse(reg.image, x) < nrmse(plain.image, x)
    with pytest.raises(ParameterError, match="image views"):
        recon.sgd(A8, y8, regularizers=[fit.TotalVariation("T1", 1.0)])
    with pytest.raises(ParameterError):
        recon.sgd(A8, y8, loss="l3")
    with pytest.raises(ShapeError):
        recon.sgd(A8, y8[:3])
