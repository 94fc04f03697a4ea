"""sim.raw_scan: the simulated data match their own forward model and noise statistics."""

import math

import pytest
import torch

from qmrkit import recon, sim
from qmrkit.errors import ParameterError


def test_cartesian_raw_scan_model_and_noise():
    s = sim.raw_scan((48, 40), n_coils=6, acceleration=2, calib=12, noise_level=0.01, seed=3)
    x, maps = s.meta["truth"], s.meta["maps"]
    full = torch.fft.fftshift(
        torch.fft.fftn(torch.fft.ifftshift(maps * x, dim=(-2, -1)), dim=(-2, -1), norm="ortho"),
        dim=(-2, -1),
    )
    resid = (s.kdata - full * s.mask)[:, s.mask]
    # residual = noise with covariance σ² Ψ: its per-coil variance matches the noise scan's
    var_data = resid.abs().pow(2).mean(1)
    var_noise = s.noise.abs().pow(2).mean(1)
    assert torch.allclose(var_data, var_noise, rtol=0.15)
    psi = recon.noise_covariance(s.noise)
    expect = s.meta["sigma"] ** 2 * s.meta["noise_covariance"]
    assert float((psi - expect.to(psi.dtype)).abs().max()) < 0.1 * float(expect.abs().max())
    assert not bool(s.kdata[:, ~s.mask].any())
    assert s.is_cartesian and s.n_coils == 6


def test_radial_raw_scan_and_errors():
    s = sim.raw_scan((32, 32), n_coils=4, trajectory="radial", acceleration=2, seed=1)
    assert s.traj.shape == (round(math.pi / 2 * 32 / 2) * 64, 2)
    assert s.kdata.shape == (4, s.traj.shape[0])
    with pytest.raises(ParameterError):
        sim.raw_scan((16, 16, 16), trajectory="radial")
    with pytest.raises(ParameterError):
        sim.raw_scan((16, 16), trajectory="spiral")
    quiet = sim.raw_scan((16, 16), n_noise_samples=0)
    assert quiet.noise is None
