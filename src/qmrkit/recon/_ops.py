"""Encoding operators of reconstruction: Cartesian ``Mask·FFT·Sense`` and non-Cartesian
``NUFFT·Sense``, input checks shared by the recon functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._device import as_tensor, resolve_device
from .._shapes import broadcast_shapes
from ..errors import DTypeError, ParameterError, ShapeError
from ..ops import FFT, LinearOperator, Mask, Sense, TensorCache


class Lift(LinearOperator):
    """Apply ``op`` over extra leading dimensions: ishape ``(*lead, *op.ishape)``.

    Used to give a NUFFT plan (``im -> M``) the coil dimension ``(C, *im) -> (C, M)`` so it
    composes with :class:`~qmrkit.ops.Sense`, and to give an operator a fixed frame dimension for
    primal–dual solvers. The normal operator is ``op``'s own (e.g. Toeplitz).
    """

    def __init__(self, op: LinearOperator, lead: Sequence[int]):
        lead = tuple(int(s) for s in lead)
        super().__init__((*lead, *op.ishape), (*lead, *op.oshape))
        self.op = op
        self.autograd_safe = op.autograd_safe

    def _forward(self, x):
        return self.op.forward(x)

    def _adjoint(self, y):
        return self.op.adjoint(y)

    def _normal(self, x):
        return self.op.normal(x)

    def normal(self, x):
        self._check(x, self.ishape, "input")
        return self.op.normal(x)


class CartesianSense(LinearOperator):
    """``Mask · FFT · Sense`` fused: image ``(*batch, *spatial)`` -> k-space ``(C, *spatial)``.

    The centred orthonormal FFT over even-sized axes is ``F z = s·c ⊙ fftn(c ⊙ z)`` with the
    checkerboard ``c_i = (−1)^{Σ i}`` over the FFT axes and the sign ``s = Π (−1)^{n/2}`` (see
    :class:`qmrkit.ops.FFT`). Folding ``c`` into the maps (``S' = c ⊙ S``) and ``s·c`` into the
    mask (``w = s·c ⊙ M``) gives

    * forward ``A x = w ⊙ fftn(S' ⊙ x)``,
    * adjoint ``Aᴴ y = Σ_c conj(S'_c) ⊙ ifftn(w ⊙ y_c)``,
    * normal ``AᴴA x = Σ_c conj(S'_c) ⊙ ifftn(M ⊙ fftn(S'_c ⊙ x))`` (``c² = 1``, ``s² = 1``),

    the same operator as the composition with three element-wise passes over the coil images
    per normal application instead of seven (they were half of a 3D CG-SENSE iteration's time).
    Built by :func:`cartesian_operator` and :func:`hybrid_readout` when every FFT axis is even.
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor, fft_axes: Sequence[int]):
        n_c = int(maps.shape[0])
        spatial = tuple(int(v) for v in maps.shape[1:])
        super().__init__(spatial, (n_c, *spatial))
        nd = len(spatial)
        self.fft_axes = tuple(int(a) for a in fft_axes)  # negative, relative to the coil images
        real = maps.real.dtype
        c = torch.ones((1,) * nd, dtype=real, device=maps.device)
        sign = 1.0
        for a in self.fft_axes:
            n = spatial[a]
            shape = [1] * nd
            shape[a] = n
            alt = 1.0 - 2.0 * (torch.arange(n, device=maps.device) % 2).to(real)
            c = c * alt.reshape(shape)
            sign = -sign if (n // 2) % 2 else sign
        m = mask.to(device=maps.device, dtype=real)
        self.maps, self.mask = maps, mask
        with torch.no_grad():
            sm = maps * c
            self._sm = TensorCache(sm)
            self._smc = TensorCache(sm.conj().resolve_conj())
            self._w = TensorCache(sign * c * m)
            self._m = TensorCache(m)

    @staticmethod
    def applies(shape: Sequence[int], fft_axes: Sequence[int]) -> bool:
        """True when every FFT axis of ``shape`` is even (the checkerboard identity holds)."""
        return all(int(shape[a]) % 2 == 0 for a in fft_axes)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.ishape)
        z = x.unsqueeze(-nd - 1) * self._sm.like(x)
        k = torch.fft.fftn(z, dim=self.fft_axes, norm="ortho")
        return k.mul_(self._w.like(k))

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        nd = len(self.ishape)
        z = torch.fft.ifftn(y * self._w.like(y), dim=self.fft_axes, norm="ortho")
        return z.mul_(self._smc.like(z)).sum(dim=-nd - 1)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.ishape)
        if not x.is_complex():
            x = x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        z = x.unsqueeze(-nd - 1) * self._sm.like(x)
        k = torch.fft.fftn(z, dim=self.fft_axes, norm="ortho")
        k.mul_(self._m.like(k))
        z = torch.fft.ifftn(k, dim=self.fft_axes, norm="ortho")
        return z.mul_(self._smc.like(z)).sum(dim=-nd - 1)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.ishape, "input")
        if torch.is_grad_enabled() and x.requires_grad:
            # in-place products on tensors autograd saved: take the out-of-place route
            return self.adjoint(self.forward(x))
        return self._normal(x)

    def __repr__(self) -> str:
        return (
            f"CartesianSense(coils={self.oshape[0]}, image={self.ishape}, fft_axes={self.fft_axes})"
        )


def to_complex(x: Any, name: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensor on ``device``; real input becomes complex64 (float64 -> complex128)."""
    t = as_tensor(x, device=device, name=name)
    if not t.is_complex():
        if not t.is_floating_point():
            raise DTypeError(f"{name} must be complex (or real floating point), got {t.dtype}")
        t = t.to(torch.complex128 if t.dtype == torch.float64 else torch.complex64)
    if dtype is not None:
        t = t.to(dtype)
    return t


def check_maps(kdata: torch.Tensor, maps: torch.Tensor, n_k: int) -> tuple[int, tuple[int, ...]]:
    """Check maps ``(C, *spatial)`` against k-space ``(*batch, C, *k)`` (``n_k`` trailing k dims).

    Returns the coil count and the spatial shape.
    """
    if maps.ndim < 2:
        raise ShapeError(f"maps must be (coils, *spatial), got shape {tuple(maps.shape)}")
    n_c = int(maps.shape[0])
    if kdata.ndim < n_k + 1:
        raise ShapeError(
            f"kdata must be (*batch, coils, *k) with {n_k} k-space dimension(s), got shape "
            f"{tuple(kdata.shape)}"
        )
    kc = int(kdata.shape[-n_k - 1])
    if kc != n_c:
        raise ShapeError(
            f"maps have {n_c} coils but kdata has {kc} (coil axis {-n_k - 1} of "
            f"{tuple(kdata.shape)}); expected maps (coils={kc}, *spatial)"
        )
    return n_c, tuple(int(s) for s in maps.shape[1:])


def cartesian_operator(
    maps: torch.Tensor, mask: Any, kdata: torch.Tensor
) -> tuple[LinearOperator, torch.Tensor]:
    """``Mask · FFT · Sense`` for k-space ``(*batch, C, *spatial)``; returns the op and the mask."""
    n_sp = maps.ndim - 1
    n_c, spatial = check_maps(kdata, maps, n_sp)
    if tuple(kdata.shape[-n_sp:]) != spatial:
        raise ShapeError(
            f"Cartesian kdata must be (*batch, coils, *spatial) with spatial = maps' {spatial}, "
            f"got {tuple(kdata.shape)}"
        )
    shape = (n_c, *spatial)
    if mask is None:
        m = (kdata != 0).any(dim=tuple(range(kdata.ndim - n_sp - 1)) + (kdata.ndim - n_sp - 1,))
    else:
        m = as_tensor(mask, device=kdata.device, name="mask")
        if m.is_complex():
            raise DTypeError(f"mask must be boolean or 0/1, got {m.dtype}")
        m = m != 0
        try:
            broadcast_shapes(tuple(m.shape), spatial)
        except ValueError:
            raise ShapeError(
                f"mask of shape {tuple(m.shape)} does not broadcast to the image shape {spatial}"
            ) from None
        if m.ndim > n_sp:
            raise ShapeError(
                f"mask must broadcast to {spatial} (one mask for all frames), got "
                f"{tuple(m.shape)}; reconstruct frames with different masks "
                "separately"
            )
    if not bool(m.any()):
        raise ParameterError("the mask samples nothing (all entries are False/0)")
    axes = tuple(range(-n_sp, 0))
    if CartesianSense.applies(spatial, axes) and maps.ndim == n_sp + 1:
        return CartesianSense(maps, m, axes), m
    op = Mask(m, shape=shape) @ FFT(shape, axes=axes) @ Sense(maps)
    return op, m


def hybrid_readout(
    maps: torch.Tensor, m: torch.Tensor, kdata: torch.Tensor, *, readout_first: bool = False
) -> tuple[LinearOperator, torch.Tensor, torch.Tensor] | None:
    """Cartesian SENSE without the readout FFT, when the readout is fully sampled.

    If the mask is constant along the readout (last) axis it commutes with the readout FFT
    ``F_x``, so ``F_x^H y = M F_pe S x``: inverse-transforming the data once along the readout
    leaves an operator with FFTs over the phase-encoding axes only and the same least-squares
    problem (``F_x`` is unitary). With ``readout_first`` the readout axis is moved in front of
    the phase-encoding axes (image ``(x, [z,] y)``), so those FFTs run over contiguous memory
    (torch's CPU FFT over strided axes was slower than a full 3D FFT); the caller moves the
    solution back with ``x.movedim(-ndim, -1)``.

    Returns ``(A, y_hybrid, maps_used)``, or None when the mask varies along the readout or the
    data are 1D.
    """
    n_sp = maps.ndim - 1
    if n_sp < 2:
        return None
    spatial = tuple(int(v) for v in maps.shape[1:])
    mf = m.expand(spatial)
    if not bool((mf == mf[..., :1]).all()):
        return None
    yh = torch.fft.fftshift(
        torch.fft.ifft(torch.fft.ifftshift(kdata, dim=-1), dim=-1, norm="ortho"), dim=-1
    )
    m_pe = mf[..., :1]
    if readout_first:
        maps = maps.movedim(-1, 1).contiguous()
        yh = yh.movedim(-1, -n_sp).contiguous()
        m_pe = m_pe.movedim(-1, 0)  # (1, *pe)
        spatial = tuple(int(v) for v in maps.shape[1:])
        fft_axes = tuple(range(-n_sp + 1, 0))
    else:
        fft_axes = tuple(range(-n_sp, -1))
    shape = (int(maps.shape[0]), *spatial)
    if CartesianSense.applies(spatial, fft_axes):
        return CartesianSense(maps, m_pe, fft_axes), yh, maps
    op = Mask(m_pe, shape=shape) @ FFT(shape, axes=fft_axes) @ Sense(maps)
    return op, yh, maps


def nufft_operator(
    maps: torch.Tensor,
    traj: Any,
    kdata: torch.Tensor,
    *,
    eps: float,
    normal: str = "auto",
    backend: str = "auto",
    device=None,
):
    """``NUFFT · Sense`` for k-space ``(*batch, C, M)``; returns (op, plan)."""
    from .. import nufft

    n_c, spatial = check_maps(kdata, maps, 1)
    dev = resolve_device(device, kdata)
    t = as_tensor(traj, device=dev, name="traj")
    if t.ndim != 2:
        raise ShapeError(
            f"traj must be (M, ndim) (one trajectory for all frames), got {tuple(t.shape)}"
        )
    if t.shape[-1] != len(spatial):
        raise ShapeError(
            f"traj has {t.shape[-1]} dimensions but maps are {len(spatial)}D "
            f"(spatial shape {spatial})"
        )
    if int(t.shape[0]) != int(kdata.shape[-1]):
        raise ShapeError(
            f"traj has {t.shape[0]} samples but kdata has {kdata.shape[-1]} "
            f"(last axis of {tuple(kdata.shape)})"
        )
    batch = n_c * max(1, int(torch.tensor(kdata.shape[:-2]).prod()) if kdata.ndim > 2 else 1)
    p = nufft.plan(
        t,
        spatial,
        eps=eps,
        batch=batch,
        device=dev,
        dtype=kdata.dtype,
        normal=normal,
        backend=backend,
    )
    return Lift(p, (n_c,)) @ Sense(maps), p


def encoding_operator(
    maps: Any,
    *,
    mask: Any = None,
    traj: Any = None,
    eps: float = 1e-3,
    normal: str = "auto",
    device=None,
) -> LinearOperator:
    """The SENSE encoding operator ``A`` (image ``spatial`` -> k-space ``(coils, *k)``).

    Cartesian with ``mask`` (``Mask·FFT·Sense``) or non-Cartesian with ``traj``
    (``NUFFT·Sense``), as used by :func:`qmrkit.recon.sense`; handy for :func:`qmrkit.recon.sgd`
    and custom solvers.

    Parameters
    ----------
    maps : array ``(coils, *spatial)``
    mask : array broadcasting to ``spatial``, optional
    traj : array ``(M, ndim)`` in cycles/pixel, optional
    eps, normal, device
        NUFFT accuracy and normal-operator choice; compute device.
    """
    dev = resolve_device(device, maps if isinstance(maps, torch.Tensor) else None)
    s = to_complex(maps, "maps", device=dev)
    n_c = int(s.shape[0])
    if (mask is None) == (traj is None):
        raise ParameterError("give exactly one of mask (Cartesian) or traj (non-Cartesian)")
    if traj is None:
        ref = torch.zeros((n_c, *s.shape[1:]), dtype=s.dtype, device=dev)
        return cartesian_operator(s, mask, ref)[0]
    t = as_tensor(traj, name="traj")
    ref = torch.zeros((n_c, int(t.shape[-2])), dtype=s.dtype, device=dev)
    return nufft_operator(s, t, ref, eps=eps, normal=normal, device=dev)[0]
