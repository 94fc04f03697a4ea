"""Trajectories and density compensation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nufft_testutils import rel

from qmrkit import nufft


def _in_range(t):
    return float(t.min()) >= -0.5 and float(t.max()) < 0.5


def test_radial_shapes_and_range():
    t = nufft.radial(8, 32)
    assert t.shape == (256, 2) and t.dtype == torch.float64 and _in_range(t)
    # spoke 0 along kx, centre sampled, spacing 1/n
    s0 = t[:32]
    assert torch.allclose(s0[:, 0], torch.zeros(32, dtype=torch.float64), atol=1e-12)
    assert s0[16, 1] == 0 and s0[17, 1] == pytest.approx(1 / 32)


def test_golden_angle_increment():
    t = nufft.golden_angle_radial(3, 16)
    a0 = math.atan2(t[16 + 15, 0], t[16 + 15, 1])  # last sample of spoke 1: +direction
    assert a0 == pytest.approx(math.pi / ((1 + math.sqrt(5)) / 2), rel=1e-9)
    tiny = nufft.golden_angle_radial(3, 16, tiny=7)
    assert _in_range(tiny)


def test_spiral_variable_density():
    t = nufft.spiral(4, 500, 64, density=2.0)
    assert t.shape == (2000, 2) and _in_range(t)
    r = t.norm(dim=1)
    # more samples inside half radius than for a uniform-density spiral
    u = nufft.spiral(4, 500, 64, density=1.0).norm(dim=1)
    assert (r < 0.25).sum() > (u < 0.25).sum()


def test_3d_trajectories():
    s = nufft.stack_of_stars(10, 32, 8)
    assert s.shape == (8 * 10 * 32, 3) and _in_range(s)
    assert set(np.round(s[:, 0].numpy() * 8).tolist()) == set(range(-4, 4))
    r = nufft.radial_3d(100, 32)
    assert r.shape == (3200, 3) and _in_range(r)
    d = r.reshape(100, 32, 3)[:, -1]
    assert torch.allclose(d.norm(dim=1), torch.full((100,), 15 / 32, dtype=torch.float64))


def test_dcf_cartesian_is_uniform():
    n = 16
    ax = (np.arange(n) - n // 2) / n
    ky, kx = np.meshgrid(ax, ax, indexing="ij")
    traj = np.stack([ky.ravel(), kx.ravel()], -1)
    w = nufft.density_compensation(traj, (n, n))
    assert w.shape == (n * n,)
    assert float(w.std() / w.mean()) < 1e-3
    assert float(w.mean()) == pytest.approx(1 / n**2, rel=0.02)


def test_dcf_radial_grows_with_radius_and_reconstructs():
    n = 32
    traj = nufft.radial(64, 2 * n)
    w = nufft.density_compensation(traj, (n, n))
    r = traj.norm(dim=1)
    inner = w[(r > 0.05) & (r < 0.1)].mean()
    outer = w[(r > 0.35) & (r < 0.4)].mean()
    assert outer / inner == pytest.approx(float(0.375 / 0.075), rel=0.25)  # w ∝ |k|
    # a smooth image is recovered by the density-compensated adjoint
    op = nufft.plan(traj, (n, n), eps=1e-4, dtype=torch.complex128, backend="torch")
    yy, xx = torch.meshgrid(torch.arange(n) - n // 2, torch.arange(n) - n // 2, indexing="ij")
    img = torch.exp(-(xx**2 + yy**2) / 30.0).to(torch.complex128)
    rec = op.H(w * op(img))
    assert rel(rec, img) < 0.05


def test_dcf_per_batch_shape():
    t = torch.stack([nufft.golden_angle_radial(8, 32), nufft.radial(8, 32)])
    w = nufft.density_compensation(t, (16, 16), n_iter=5)
    assert w.shape == (2, 256)
