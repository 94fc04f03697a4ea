"""Shared simulation helpers of the reconstruction tests."""

import math

import numpy as np
import torch

from qmrkit.sim.coils import coil_maps
from qmrkit.sim.shepp_logan import shepp_logan


def cfft(a, axes=(-2, -1), inverse=False):
    a = torch.fft.ifftshift(a, dim=axes)
    a = (torch.fft.ifftn if inverse else torch.fft.fftn)(a, dim=axes, norm="ortho")
    return torch.fft.fftshift(a, dim=axes)


def phantom(n=64, n_coils=8, dtype=torch.complex64, device="cpu", ndim=2):
    shape = (n,) * ndim
    ph = shepp_logan(shape)
    x = torch.tensor(ph["image"], dtype=dtype, device=device)
    s = coil_maps(n_coils, shape, dtype=dtype, device=device)
    obj = torch.tensor(ph["labels"] > 0, device=device)
    return x, s, obj


def noise_like(y, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    re = torch.randn(y.shape, generator=g, dtype=torch.float64)
    im = torch.randn(y.shape, generator=g, dtype=torch.float64)
    return (sigma / math.sqrt(2) * torch.complex(re, im)).to(y.dtype).to(y.device)


def nrmse(a, b):
    return float((a - b).abs().norm() / b.abs().norm())


def align_phase(a, ref):
    """Multiply ``a`` by the global phase that best matches ``ref``."""
    c = torch.vdot(a.reshape(-1), ref.reshape(-1))
    return a * (c / c.abs())


def map_correlation(est, true, obj):
    """Mean over object pixels of |<est, true>| / (|est| |true|) over coils (1 = equal up to a
    per-pixel phase), and the Pearson correlation of the coil magnitudes inside the object."""
    num = (est.conj() * true).sum(0).abs()
    den = est.abs().pow(2).sum(0).sqrt() * true.abs().pow(2).sum(0).sqrt()
    vec = float((num / den.clamp_min(1e-12))[obj].mean())
    a = est.abs()[:, obj].reshape(-1).double().numpy()
    b = true.abs()[:, obj].reshape(-1).double().numpy()
    return vec, float(np.corrcoef(a, b)[0, 1])


def sense_g_factor(maps, r):
    """Analytic g-factor map of uniform 1D Cartesian undersampling by ``r`` along axis -2
    (Pruessmann 1999): g = sqrt([(SᴴS)⁻¹]_ρρ [SᴴS]_ρρ) on every set of aliased pixels."""
    s = maps.to(torch.complex128).numpy()
    n_c, ny, nx = s.shape
    g = np.zeros((ny, nx))
    step = ny // r
    for y0 in range(step):
        rows = [y0 + j * step for j in range(r)]
        for x0 in range(nx):
            a = s[:, rows, x0]  # (C, r)
            m = a.conj().T @ a
            inv = np.linalg.pinv(m)
            g[rows, x0] = np.sqrt(np.abs(np.diag(inv) * np.diag(m)))
    return torch.tensor(g)
