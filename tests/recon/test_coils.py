"""Coil maps (ESPIRiT, Walsh), RSS, prewhitening and coil compression."""

import math

import numpy as np
import pytest
import torch

from qmrkit import recon
from qmrkit.errors import ParameterError, QmrkitWarning, ShapeError
from qmrkit.sim import cartesian_mask, coil_maps

from ._helpers import cfft, map_correlation, noise_like, phantom


def test_espirit_matches_simulated_maps_2d():
    x, maps, obj = phantom(64, 8)
    y = cfft(maps * x)
    y = y * cartesian_mask((64, 64), 3, calib=24)
    y = y + noise_like(y, 1e-3 * float(y.abs().max())) * (y != 0)
    est, ev = recon.espirit(y, calib=24, return_eigenvalues=True)
    vec, mag = map_correlation(est, maps, obj)
    assert vec >= 0.99 and mag >= 0.99, (vec, mag)
    assert est.shape == maps.shape and est.dtype == y.dtype
    # unit norm inside the object, zero (cropped) far outside
    torch.testing.assert_close(
        est.abs().pow(2).sum(0)[obj], torch.ones(int(obj.sum())), atol=1e-4, rtol=0
    )
    assert float(ev[obj].min()) > 0.95


@pytest.mark.slow
def test_espirit_3d_decoupled_readout():
    n = 24
    x, maps, obj = phantom(n, 8, ndim=3)
    y = cfft(maps * x, axes=(-3, -2, -1))
    est = recon.espirit(y, calib=12, kernel=5)
    vec, mag = map_correlation(est, maps, obj)
    assert vec >= 0.99 and mag >= 0.99, (vec, mag)
    full3d = recon.espirit(y, calib=12, kernel=5, decouple_readout=False)
    vec3, mag3 = map_correlation(full3d, maps, obj)
    assert vec3 >= 0.99 and mag3 >= 0.99, (vec3, mag3)


def test_walsh_matches_simulated_maps():
    x, maps, obj = phantom(64, 8)
    y = cfft(maps * x)
    low = recon.low_resolution_images(y, calib=24)
    est = recon.walsh(low, kernel=7)
    vec, mag = map_correlation(est, maps, obj)
    assert vec >= 0.99 and mag >= 0.99, (vec, mag)
    torch.testing.assert_close(est.abs().pow(2).sum(0), torch.ones(64, 64), atol=1e-4, rtol=0)


def test_rss():
    x, maps, _ = phantom(32, 4)
    img = recon.rss(maps * x)
    torch.testing.assert_close(img, x.abs(), atol=1e-5, rtol=0)  # Σ|S|² = 1


def _correlated_noise(n_c, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.complex(
        torch.randn(n_c, n_c, generator=g, dtype=torch.float64),
        torch.randn(n_c, n_c, generator=g, dtype=torch.float64),
    )
    mix = torch.eye(n_c, dtype=torch.complex128) + 0.4 * a
    white = torch.complex(
        torch.randn(n_c, n, generator=g, dtype=torch.float64),
        torch.randn(n_c, n, generator=g, dtype=torch.float64),
    ) / math.sqrt(2)
    return mix, mix @ white


def test_prewhiten_decorrelates():
    mix, noise = _correlated_noise(6, 20000)
    g = torch.Generator().manual_seed(1)  # the scan's own noise: same mixing, new samples
    white = torch.complex(
        torch.randn(6, 5000, generator=g, dtype=torch.float64),
        torch.randn(6, 5000, generator=g, dtype=torch.float64),
    ) / math.sqrt(2)
    data = mix @ white
    w_data, w = recon.prewhiten(data.reshape(6, 50, 100), noise, return_matrix=True)
    cov = recon.noise_covariance(w_data)
    # sampling error of a covariance estimate from 5000 samples: ~1/sqrt(5000) = 0.014
    torch.testing.assert_close(cov, torch.eye(6, dtype=cov.dtype), atol=0.06, rtol=0)
    assert w.shape == (6, 6)
    # batch dimension before the coils
    w2 = recon.prewhiten(data.reshape(6, 50, 100).unsqueeze(0), noise)
    torch.testing.assert_close(w2[0], w_data)
    # a batch axis as long as the coil axis: say which one is the coil axis
    frames = torch.stack([data.reshape(6, 50, 100)] * 6)  # (6 frames, 6 coils, ...)
    w3 = recon.prewhiten(frames, noise, coil_axis=1)
    torch.testing.assert_close(w3[2], w_data)
    with pytest.raises(ShapeError, match="noise scan has 6 coils"):
        recon.prewhiten(frames, noise, coil_axis=2)


def test_prewhiten_missing_noise():
    y = torch.zeros(4, 8, 8, dtype=torch.complex64)
    with pytest.raises(ParameterError, match="noise scan"):
        recon.prewhiten(y, None)
    with pytest.warns(QmrkitWarning, match="no noise scan"):
        out = recon.prewhiten(y, None, missing="identity")
    assert out is y
    with pytest.raises(ShapeError, match="fewer than"):
        recon.prewhiten(y, torch.ones(4, 2, dtype=torch.complex64))
    with pytest.raises(ShapeError, match="no axis"):
        recon.prewhiten(y, torch.randn(5, 100, dtype=torch.complex64))


def test_prewhiten_with_a_covariance_equals_with_its_samples():
    """A stored covariance (noise_covariance of the samples) whitens exactly like the samples."""
    _, noise = _correlated_noise(6, 4000)
    noise = noise.to(torch.complex64)
    y = torch.randn(6, 20, 30, dtype=torch.complex64)
    w_s, m_s = recon.prewhiten(y, noise, return_matrix=True)
    w_c, m_c = recon.prewhiten(y, covariance=recon.noise_covariance(noise), return_matrix=True)
    torch.testing.assert_close(w_c, w_s, rtol=0, atol=0)
    torch.testing.assert_close(m_c, m_s, rtol=0, atol=0)
    # numpy complex64 covariance (as a store keeps it) and the reference float64 whitening
    cov = recon.noise_covariance(noise).numpy()
    ref = np.linalg.solve(np.linalg.cholesky(cov.astype(np.complex128)), y.numpy().reshape(6, -1))
    np.testing.assert_allclose(
        recon.prewhiten(y, covariance=cov).numpy().reshape(6, -1), ref, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ParameterError, match="not both"):
        recon.prewhiten(y, noise, covariance=cov)
    with pytest.raises(ShapeError, match="square"):
        recon.prewhiten(y, covariance=cov[:, :5])
    with pytest.raises(ShapeError, match="6 coils but no axis"):
        recon.prewhiten(torch.zeros(4, 8, dtype=torch.complex64), covariance=cov)


def test_coil_compression_svd_and_gcc():
    n = 48
    x, _, _ = phantom(n, 8)
    maps = coil_maps(16, (n, n))
    y = cfft(maps * x)
    y = y + noise_like(y, 1e-3 * float(y.abs().max()))
    yv, a = recon.coil_compress(y, 6, return_matrix=True)
    assert yv.shape == (6, n, n) and a.shape == (6, 16)
    # energy kept by the first virtual coils ≥ 99% (smooth birdcage maps are low rank)
    kept = float(yv.abs().pow(2).sum() / y.abs().pow(2).sum())
    assert kept > 0.99
    # GCC with window 1 is the per-readout-position optimum: it keeps at least SVD's energy
    yg = recon.coil_compress(y, 3, method="gcc", window=1)
    ys = recon.coil_compress(y, 3, method="svd")
    assert float(yg.abs().pow(2).sum()) >= float(ys.abs().pow(2).sum()) * (1 - 1e-6)
    # and a SENSE reconstruction from compressed data (maps compressed the same way) still works
    mask = cartesian_mask((n, n), 2, calib=16)
    from qmrkit.recon import sense

    mv = torch.tensordot(a, maps, dims=([1], [0]))
    res = sense(yv * mask, mv, mask=mask, max_iter=40)
    assert float((res.image - x).abs().norm() / x.abs().norm()) < 0.05
    with pytest.raises(ParameterError):
        recon.coil_compress(y, 17)
    with pytest.raises(ParameterError):
        recon.coil_compress(y, 4, method="pca")
