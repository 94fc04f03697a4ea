"""Toeplitz embedding of the normal operator AᴴA of a NUFFT.

``(AᴴA x)_r = Σ_r' t(r − r') x_r'`` with the point-spread function ``t(δ) = Σ_m exp(2πi k_m·δ)``
for ``δ ∈ [−(N−1), N−1]``. Embedded in a circulant of size 2N per axis, AᴴA becomes
``crop(IFFT(K̂ · FFT(pad(x))))``: two FFTs of size 2N and no gridding at all, independent of ε
(the PSF itself is computed once, with an adjoint NUFFT of ones on the 2N image at accuracy ε).

The PSF and ``K̂`` are computed in float64 whatever the plan's dtype: the PSF's dynamic range
(``t(0) = M``) made a float32 PSF cost 3e-4 relative error at 256², 2e5 samples; only the final
kernel is cast to the plan's precision.

Because ``t(−δ) = conj(t(δ))`` (and the unused index −N is set to zero), ``K̂`` is real: it is
stored as a real tensor, halving its memory. The FFTs are pruned: the zero padding is done one
axis at a time with ``torch.fft.fft(..., n=2N)``, so only non-zero lines are transformed (3/4 of a
full 2D transform, 7/12 of a 3D one), and the inverse crops after each axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def toeplitz_kernel(psf: torch.Tensor, im_size: Sequence[int]) -> torch.Tensor:
    """Real FFT kernel ``K̂`` of shape ``(..., *2N)`` from a PSF image ``(..., *2N)``.

    Parameters
    ----------
    psf : Tensor
        Adjoint NUFFT of unit samples on the ``2N`` image (centred index ``r ∈ [−N, N−1]``).
    im_size : tuple of int
        Image size N.
    """
    nd = len(im_size)
    dims = tuple(range(psf.ndim - nd, psf.ndim))
    t = torch.fft.ifftshift(psf, dim=dims)  # index r -> r mod 2N
    for ax, n in zip(dims, im_size, strict=True):
        t.select(ax, n).zero_()  # the index −N ≡ N is never used by an N-pixel image
    k = torch.fft.fftn(t, dim=dims)
    return k.real.contiguous()


def toeplitz_apply(x: torch.Tensor, kernel: torch.Tensor, im_size: Sequence[int]) -> torch.Tensor:
    """``AᴴA x`` for ``x`` of shape ``(..., *N)`` with a real kernel ``(..., *2N)`` (broadcast)."""
    nd = len(im_size)
    y = x
    for i in range(nd - 1, -1, -1):
        ax = x.ndim - nd + i
        y = torch.fft.fft(y, n=2 * im_size[i], dim=ax)
    y = y * kernel
    for i in range(nd):
        ax = x.ndim - nd + i
        y = torch.fft.ifft(y, dim=ax).narrow(ax, 0, im_size[i])
    return y


class ToeplitzNormal:
    """The normal operator of a NUFFT by Toeplitz embedding.

    Parameters
    ----------
    psf : Tensor
        Adjoint NUFFT of unit samples on the doubled image size, ``(..., *2N)`` (complex128).
    im_size : tuple of int
        Image size N.
    dtype : torch.dtype, optional
        Complex dtype of the data; the real kernel is stored in the matching real precision.
    """

    def __init__(self, psf: torch.Tensor, im_size: Sequence[int], dtype: torch.dtype | None = None):
        self.im_size = tuple(int(n) for n in im_size)
        kernel = toeplitz_kernel(psf, self.im_size)
        if dtype is not None:
            kernel = kernel.to(torch.float32 if dtype == torch.complex64 else torch.float64)
        self.kernel = kernel

    @classmethod
    def build(
        cls, adjoint_2n: Callable[[], torch.Tensor], im_size: Sequence[int]
    ) -> ToeplitzNormal:
        return cls(adjoint_2n(), im_size)

    def memory_bytes(self) -> int:
        return self.kernel.numel() * self.kernel.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return toeplitz_apply(x, self.kernel, self.im_size)
