"""Coil sensitivities (SENSE): expand an image into coil images."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._device import as_tensor
from ..errors import ShapeError
from ._util import TensorCache
from .base import LinearOperator


class Sense(LinearOperator):
    """Coil expansion ``(*batch, *img) -> (*batch, coils, *img)``: ``y_c = S_c · x``.

    The adjoint is the coil combination ``x = Σ_c conj(S_c) · y_c`` and the normal operator is
    ``Σ_c |S_c|² · x`` (computed once). Batch dimensions of the image (frames, echoes) lead and
    broadcast; the coil axis of the output sits just before the image dimensions, as in the
    k-space layout ``(*batch, coils, *k)``.

    Parameters
    ----------
    maps : complex tensor or array
        Coil sensitivities with one coil axis and the image dimensions, e.g. ``(coils, ny, nx)``.
    coil_axis : int
        Axis of ``maps`` that indexes coils (default 0). Maps stored coil-last, e.g.
        ``(ny, nx, coils)``, are accepted with ``coil_axis=-1``.
    ishape : tuple of int, optional
        Expected image shape; a :class:`~qmrkit.errors.ShapeError` is raised when the maps'
        spatial shape differs (catches a transposed or wrongly cropped map early).

    Examples
    --------
    >>> S = Sense(maps)                       # maps (8, 128, 128)
    >>> A = Mask(mask) @ FFT((8, 128, 128), axes=(-2, -1)) @ S
    """

    def __init__(self, maps, coil_axis: int = 0, ishape: Sequence[int] | None = None):
        m = as_tensor(maps, name="maps")
        if m.ndim < 2:
            raise ShapeError(
                f"Sense: maps need a coil axis and at least one spatial axis, got "
                f"shape {tuple(m.shape)}"
            )
        if not -m.ndim <= coil_axis < m.ndim:
            raise ShapeError(
                f"Sense: coil_axis={coil_axis} is out of range for maps of shape {tuple(m.shape)}"
            )
        m = torch.movedim(m, coil_axis, 0)
        img = tuple(m.shape[1:])
        if ishape is not None and tuple(int(s) for s in ishape) != img:
            raise ShapeError(
                f"Sense: maps have spatial shape {img} (coils={m.shape[0]}) but the "
                f"image shape is {tuple(int(s) for s in ishape)}"
            )
        if not m.is_complex():
            m = m.to(torch.complex128 if m.dtype == torch.float64 else torch.complex64)
        super().__init__(img, (m.shape[0], *img))
        self.maps = m
        self.n_coils = int(m.shape[0])
        self._m = TensorCache(m)
        self._s = TensorCache((m.abs() ** 2).sum(0))

    def _forward(self, x):
        return x.unsqueeze(-len(self.ishape) - 1) * self._m.like(x)

    def _adjoint(self, y):
        return (y * self._m.like(y).conj()).sum(dim=-len(self.ishape) - 1)

    def _normal(self, x):
        if self.maps.requires_grad:  # keep the graph through the maps
            return self._adjoint(self._forward(x))
        if not x.is_complex():
            x = x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        return x * self._s.like(x)

    def __repr__(self) -> str:
        return f"Sense(coils={self.n_coils}, image={self.ishape})"
