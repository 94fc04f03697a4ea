"""The (centred, orthonormal) discrete Fourier transform as a linear operator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ParameterError
from ._util import TensorCache, normalise_axes
from .base import LinearOperator

_ADJOINT_NORM = {"ortho": "ortho", "backward": "forward", "forward": "backward"}


class FFT(LinearOperator):
    """Multidimensional FFT over chosen axes of a trailing shape.

    With ``centred=True`` (the MRI convention) the transform is ``fftshift(fftn(ifftshift(x)))``:
    the image centre (index ``n // 2``) and the k-space centre (DC at index ``n // 2``) both sit in
    the middle of the array. With ``norm="ortho"`` the operator is unitary, so ``A.H`` is its
    inverse and ``A.N`` is the identity.

    Parameters
    ----------
    shape : tuple of int
        Trailing shape of inputs and outputs, e.g. ``(ny, nx)`` or ``(nz, ny, nx)``.
    axes : sequence of int, optional
        Axes of ``shape`` to transform (``0..len(shape)-1`` or negative); all of them by default.
        ``FFT((nz, ny, nx), axes=(-2, -1))`` transforms each slice in 2D.
    centred : bool
        Shift so the centre of both domains is in the middle of the array (default True).
    norm : {"ortho", "backward", "forward"}
        Scaling as in :func:`torch.fft.fftn`; the adjoint uses the matching inverse scaling.

    Examples
    --------
    >>> F = FFT((64, 64))
    >>> k = F(torch.randn(8, 64, 64, dtype=torch.complex64))   # 8 coils, transformed in 2D
    """

    def __init__(
        self,
        shape: Sequence[int],
        axes: Sequence[int] | int | None = None,
        centred: bool = True,
        norm: str = "ortho",
    ):
        super().__init__(shape, shape)
        if norm not in _ADJOINT_NORM:
            raise ParameterError(f"FFT: norm must be one of {sorted(_ADJOINT_NORM)}, got {norm!r}")
        self.axes = normalise_axes(axes, len(self.ishape), "FFT")
        if not self.axes:
            raise ParameterError("FFT: axes is empty; give at least one axis to transform")
        self.centred = bool(centred)
        self.norm = norm
        n = 1
        for a in self.axes:
            n *= self.ishape[a]
        self._n = n
        # For even sizes the shifts are a checkerboard modulation:
        #   fftshift(fftn(ifftshift(x))) = s · c ⊙ fftn(c ⊙ x),  c_i = (−1)^i,  s = (−1)^(n/2)
        # per axis (the same holds for the inverse). Two multiplications, one of them in place,
        # are cheaper than two rolls (≈25% of a 2-D centred FFT of 8×256² on CPU).
        self._modulate = self.centred and all(self.ishape[a] % 2 == 0 for a in self.axes)
        if self._modulate:
            c = torch.ones((1,) * len(self.ishape), dtype=torch.float64)
            sign = 1.0
            for a in self.axes:
                m = self.ishape[a]
                shape = [1] * len(self.ishape)
                shape[a] = m
                c = c * (1.0 - 2.0 * (torch.arange(m, dtype=torch.float64) % 2)).reshape(shape)
                if (m // 2) % 2:
                    sign = -sign
            self._c = TensorCache(c)
            self._sc = TensorCache(sign * c)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._modulate:
            k = torch.fft.fftn(x * self._c.like(x), dim=self.axes, norm=self.norm)
            return k.mul_(self._sc.like(k))
        if self.centred:
            x = torch.fft.ifftshift(x, dim=self.axes)
        k = torch.fft.fftn(x, dim=self.axes, norm=self.norm)
        return torch.fft.fftshift(k, dim=self.axes) if self.centred else k

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if self._modulate:
            x = torch.fft.ifftn(y * self._c.like(y), dim=self.axes, norm=_ADJOINT_NORM[self.norm])
            return x.mul_(self._sc.like(x))
        if self.centred:
            y = torch.fft.ifftshift(y, dim=self.axes)
        x = torch.fft.ifftn(y, dim=self.axes, norm=_ADJOINT_NORM[self.norm])
        return torch.fft.fftshift(x, dim=self.axes) if self.centred else x

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "ortho":
            return x if x.is_complex() else x.to(_complex(x.dtype))
        scale = self._n if self.norm == "backward" else 1.0 / self._n
        return scale * (x if x.is_complex() else x.to(_complex(x.dtype)))

    def __repr__(self) -> str:
        return (
            f"FFT(shape={self.ishape}, axes={self.axes}, centred={self.centred}, "
            f"norm={self.norm!r})"
        )


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
