"""Subspace MRF reconstruction: the folded operator against per-frame NUFFTs, adjointness, CG."""

import math

import torch

from qmrkit import mrf, nufft
from qmrkit.ops import check_adjoint


def _setup(T=40, S=200, N=24, K=4, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    arm = nufft.spiral(1, S, N, density=1.5)  # one interleaf, rotated every frame
    ang = torch.arange(T, dtype=torch.float64) * (2 * math.pi * 0.381966)  # golden-angle rotation
    rot = torch.stack(
        [torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2
    )
    traj = torch.einsum("tij,sj->tsi", rot, arm.double()).clamp(-0.5, 0.5 - 1e-9).float()
    q, _ = torch.linalg.qr(
        torch.randn(T, K, generator=g, dtype=torch.float64)
        + 1j * torch.randn(T, K, generator=g, dtype=torch.float64)
    )
    basis = q.to(torch.complex64)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, N), torch.linspace(-1, 1, N), indexing="ij")
    maps = torch.stack(
        [
            torch.exp(-((yy - a) ** 2 + (xx - b) ** 2))
            * torch.exp(1j * torch.tensor(c * yy.numpy()))
            for a, b, c in [(-1, 0, 0.5), (1, 0, -0.3), (0, 1, 1.0)][:C]
        ]
    ).to(torch.complex64)
    maps = maps / (maps.abs() ** 2).sum(0).sqrt()  # normalised like ESPIRiT maps: Σ|S|² = 1
    return traj, basis, maps


def test_folded_operator_equals_per_frame_nufft():
    traj, basis, maps = _setup()
    T, S, _ = traj.shape
    N = maps.shape[-1]
    g = torch.Generator().manual_seed(1)
    c = torch.randn(basis.shape[1], N, N, generator=g, dtype=torch.complex64)
    op = mrf.SubspaceNufft(traj, (N, N), basis, maps=maps, eps=1e-6)
    y = op(c)
    # independent route: build every frame's image, apply coils, one NUFFT per frame
    x_t = torch.einsum("tk,kyx->tyx", basis, c)
    ref = torch.stack(
        [nufft.plan(traj[t], (N, N), eps=1e-6).forward(maps * x_t[t]) for t in range(T)], dim=1
    )
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    assert check_adjoint(op) < 1e-5
    op_nc = mrf.SubspaceNufft(traj, (N, N), basis, eps=1e-6)  # no coils: (T, S)
    assert op_nc(c).shape == (T, S) and check_adjoint(op_nc) < 1e-5


def test_cg_subspace_recovers_coefficients():
    traj, basis, maps = _setup(T=60, S=240)
    N = maps.shape[-1]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, N), torch.linspace(-1, 1, N), indexing="ij")
    # a smooth object: a radially sampled spiral leaves k-space corners unmeasured, so sharp edges
    # would put part of the object in the null space of the operator
    disk = torch.exp(-(yy**2 + xx**2) / 0.3).to(torch.complex64)
    c = torch.stack(
        [disk * (k + 1) * torch.exp(1j * torch.tensor(0.3 * k)) for k in range(basis.shape[1])]
    )
    op = mrf.SubspaceNufft(traj, (N, N), basis, maps=maps, eps=1e-6)
    y = op(c)
    grid = mrf.subspace_recon(y, traj, basis, (N, N), maps=maps, n_iter=0)
    est = mrf.subspace_recon(y, traj, basis, (N, N), maps=maps, n_iter=60)
    err = lambda a: float((a - c).norm() / c.norm())  # noqa: E731
    assert err(est) < 0.01 and err(est) < 0.2 * err(grid)


def test_frame_dcf_equals_union_dcf_for_repeated_interleaves():
    """Density compensation of frames that repeat interleaves equals that of their union."""
    arms = nufft.spiral(6, 120, 24).reshape(6, 120, 2).float()
    traj = arms[torch.arange(18) % 6]  # 18 frames, each interleaf 3 times
    w = mrf.frame_dcf(traj, (24, 24))
    ref = nufft.density_compensation(arms.reshape(-1, 2), (24, 24)).reshape(6, 120)
    torch.testing.assert_close(w[:6] * 3, ref)
    assert torch.equal(w[:6], w[6:12])
