"""Subspace (low-rank) reconstruction of MRF k-space.

The time series of every voxel is modelled as x(r, t) = Σₖ Φ(t, k)·cₖ(r) with the dictionary's
temporal basis Φ (n_tr × K). With one k-space readout per TR (frame t, trajectory kₜ), the
forward model of coil c is

    y_c(m) = Σₖ Φ(t(m), k) · NUFFT(S_c · cₖ)(k_m)      for sample m of frame t(m),

so the K coefficient images need only K NUFFTs over *all* samples at once (one plan on the whole
trajectory) plus a per-sample weighting by Φ — the per-frame NUFFTs are folded into the basis.
:class:`SubspaceNufft` is that operator; :func:`subspace_recon` computes the density-compensated
adjoint (the classic "project then grid" reconstruction) and, optionally, refines it by conjugate
gradients on the subspace least-squares problem.
"""

from __future__ import annotations

from typing import Any

import torch

from .._device import resolve_device
from .._progress import get_logger
from ..errors import ShapeError
from ..ops.base import LinearOperator

log = get_logger("mrf.subspace")


class SubspaceNufft(LinearOperator):
    """Coefficient images ``(K, *im)`` → k-space ``(C, T, S)`` (or ``(T, S)`` without coils).

    Parameters
    ----------
    traj : Tensor (T, S, ndim)
        One readout per frame, cycles/pixel in [-0.5, 0.5).
    im_size : tuple of int
        Image size.
    basis : Tensor (T, K)
        Orthonormal temporal basis (``Dictionary.basis``).
    maps : Tensor (C, *im), optional
        Coil sensitivities; without them the operator has no coil axis.
    weights : Tensor (T, S), optional
        Square roots of density-compensation weights applied symmetrically (preconditioning).
    eps : float
        NUFFT accuracy.
    """

    def __init__(
        self,
        traj: torch.Tensor,
        im_size: tuple[int, ...],
        basis: torch.Tensor,
        *,
        maps: torch.Tensor | None = None,
        eps: float = 1e-3,
        device: Any = None,
        nufft_options: dict | None = None,
    ):
        from .. import nufft

        dev = resolve_device(device, traj)
        T, S, nd = traj.shape
        if nd != len(im_size):
            raise ShapeError(f"trajectory has {nd} dimensions but im_size is {tuple(im_size)}")
        if basis.shape[0] != T:
            raise ShapeError(f"basis has {basis.shape[0]} frames but the trajectory has {T}")
        self.T, self.S, self.K = T, S, int(basis.shape[1])
        self.im_size = tuple(int(n) for n in im_size)
        self.maps = None if maps is None else maps.to(dev, torch.complex64)
        if self.maps is not None and tuple(self.maps.shape[1:]) != self.im_size:
            raise ShapeError(
                f"maps have image shape {tuple(self.maps.shape[1:])}, expected {self.im_size}"
            )
        self.C = 0 if self.maps is None else int(self.maps.shape[0])
        self.phi = basis.to(dev, torch.complex64)  # (T, K)
        self.plan = nufft.plan(
            traj.reshape(T * S, nd).to(dev),
            self.im_size,
            eps=eps,
            batch=max(self.C, 1) * self.K,
            device=dev,
            **(nufft_options or {}),
        )
        oshape = (self.C, T, S) if self.C else (T, S)
        super().__init__((self.K, *self.im_size), oshape)

    def _forward(self, c: torch.Tensor) -> torch.Tensor:
        lead = c.shape[: c.ndim - 1 - len(self.im_size)]
        img = (
            c
            if self.maps is None
            else c.unsqueeze(-len(self.im_size) - 2) * self.maps.unsqueeze(-len(self.im_size) - 1)
        )
        k = self.plan.forward(img)  # (..., [C,] K, T·S)
        k = k.reshape(*k.shape[:-1], self.T, self.S)
        y = torch.einsum("...kts,tk->...ts", k, self.phi)
        return y.reshape(*lead, *self.oshape)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("...ts,tk->...kts", y, self.phi.conj())
        z = z.reshape(*z.shape[:-2], self.T * self.S)
        img = self.plan.adjoint(z)  # (..., [C,] K, *im)
        if self.maps is None:
            return img
        return (img * self.maps.conj().unsqueeze(-len(self.im_size) - 1)).sum(
            dim=-len(self.im_size) - 2
        )


def frame_dcf(traj: torch.Tensor, im_size: tuple[int, ...]) -> torch.Tensor:
    """Density compensation ``(T, S)`` of a per-frame trajectory ``(T, S, ndim)``.

    MRF repeats a few interleaves over many frames; the weights are computed once on the distinct
    frames and each of r identical copies of a frame gets 1/r of its weight — exactly what
    density compensation of the union gives for repeated samples, at a fraction of the cost.
    """
    from .. import nufft

    T, S, nd = traj.shape
    uniq, inverse, counts = torch.unique(
        traj.reshape(T, S * nd), dim=0, return_inverse=True, return_counts=True
    )
    w = nufft.density_compensation(uniq.reshape(-1, nd), im_size).reshape(-1, S)
    return w[inverse] / counts[inverse, None].to(w.dtype)


def subspace_recon(
    kdata: torch.Tensor,
    traj: torch.Tensor,
    basis: torch.Tensor,
    im_size: tuple[int, ...],
    *,
    maps: torch.Tensor | None = None,
    dcf: torch.Tensor | None = None,
    n_iter: int = 0,
    lam: float = 0.0,
    eps: float = 1e-3,
    device: Any = None,
) -> torch.Tensor:
    """Reconstruct subspace coefficient images from MRF k-space.

    Parameters
    ----------
    kdata : Tensor (C, T, S)
        Coil k-space, one readout of S samples per frame (TR).
    traj : Tensor (T, S, ndim)
        Trajectory per frame in cycles/pixel.
    basis : Tensor (T, K)
        Temporal basis.
    im_size : tuple of int
        Image size.
    maps : Tensor (C, *im), optional
        Coil sensitivities. Without them, coil images ``(C, K, *im)`` are returned (combine them
        afterwards); with them, the coil-combined ``(K, *im)``.
    dcf : Tensor (T, S), optional
        Density compensation for the gridding start (default: Pipe–Menon on the whole trajectory).
    n_iter : int
        Conjugate-gradient iterations on the density-weighted least-squares problem
        ‖D^½(A c − y)‖² + λ‖c‖² from the gridding start (needs maps).
    lam : float
        Tikhonov weight λ (absolute, in the units of AᴴA).
    eps : float
        NUFFT accuracy.
    """

    dev = resolve_device(device, kdata)
    if kdata.ndim != 3:
        raise ShapeError(f"kdata must be (coils, frames, samples), got shape {tuple(kdata.shape)}")
    C, T, S = kdata.shape
    if tuple(traj.shape[:2]) != (T, S):
        raise ShapeError(
            f"trajectory shape {tuple(traj.shape)} does not match kdata frames×samples ({T}, {S})"
        )
    kdata = kdata.to(dev, torch.complex64)
    if dcf is None:
        dcf = frame_dcf(traj.to(dev), im_size)
    dcf = dcf.to(dev).real.to(torch.float32)
    op = SubspaceNufft(traj.to(dev), im_size, basis, maps=maps, eps=eps, device=dev)
    # density-compensated adjoint; the factor T makes a constant-in-time image come back at its
    # own scale (each frame samples k-space about 1/T as densely as the whole trajectory)
    if maps is None:  # coil images (C, K, *im): the coil axis acts as a batch axis
        start = op.adjoint(kdata * dcf) * T
    else:
        start = op.adjoint(kdata * dcf) * T
    if n_iter <= 0:
        return start
    if maps is None:
        raise ShapeError("iterative subspace reconstruction needs coil maps (maps=...)")
    from ..optim import cg

    # density-weighted least squares ‖D^½(A c − y)‖² + λ‖c‖²: the same solution for consistent
    # data, but far better conditioned than plain least squares on variable-density spirals
    w = dcf * T
    rhs = op.adjoint(kdata * w)
    ax = op.forward(start)
    # scale the start to the weighted least-squares optimum along it
    a = torch.vdot((ax * w).reshape(-1), kdata.reshape(-1)) / torch.vdot(
        (ax * w).reshape(-1), ax.reshape(-1)
    ).real.clamp_min(1e-30)
    res = cg(
        lambda c: op.adjoint(w * op.forward(c)),
        rhs,
        x0=start * a,
        lam=lam,
        max_iter=n_iter,
        tol=0.0,
    )
    log.info("subspace CG: %d iterations", n_iter)
    return res.x
