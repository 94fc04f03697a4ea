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
        Expected image (spatial) shape; a :class:`~qmrkit.errors.ShapeError` is raised when the
        maps' spatial shape differs (catches a transposed or wrongly cropped map early).
    set_axis : int, optional
        Axis of ``maps`` that indexes several sets of maps (ESPIRiT's "soft SENSE", e.g. maps
        ``(sets, coils, ny, nx)``). The operator then maps ``(*batch, sets, *img) ->
        (*batch, coils, *img)`` with ``y_c = Σ_s S_{s,c} · x_s``; the adjoint gives one image per
        set, and the normal operator couples the sets (no diagonal shortcut).

    Examples
    --------
    >>> S = Sense(maps)                       # maps (8, 128, 128)
    >>> A = Mask(mask) @ FFT((8, 128, 128), axes=(-2, -1)) @ S
    """

    def __init__(
        self,
        maps,
        coil_axis: int = 0,
        ishape: Sequence[int] | None = None,
        set_axis: int | None = None,
    ):
        m = as_tensor(maps, name="maps")
        n_lead = 1 if set_axis is None else 2
        if m.ndim < n_lead + 1:
            raise ShapeError(
                f"Sense: maps need a coil axis{' and a set axis' if set_axis is not None else ''}"
                f" and at least one spatial axis, got shape {tuple(m.shape)}"
            )
        for what, ax in (("coil_axis", coil_axis), ("set_axis", set_axis)):
            if ax is not None and not -m.ndim <= ax < m.ndim:
                raise ShapeError(
                    f"Sense: {what}={ax} is out of range for maps of shape {tuple(m.shape)}"
                )
        if set_axis is None:
            m = torch.movedim(m, coil_axis, 0)
        else:
            if coil_axis % m.ndim == set_axis % m.ndim:
                raise ShapeError(f"Sense: coil_axis and set_axis are the same axis ({coil_axis})")
            m = torch.movedim(m, (set_axis, coil_axis), (0, 1))
        img = tuple(m.shape[n_lead:])
        if ishape is not None and tuple(int(s) for s in ishape) != img:
            raise ShapeError(
                f"Sense: maps have spatial shape {img} (coils={m.shape[n_lead - 1]}) but the "
                f"image shape is {tuple(int(s) for s in ishape)}"
            )
        if not m.is_complex():
            m = m.to(torch.complex128 if m.dtype == torch.float64 else torch.complex64)
        self.n_sets = None if set_axis is None else int(m.shape[0])
        self.n_coils = int(m.shape[n_lead - 1])
        in_shape = img if set_axis is None else (self.n_sets, *img)
        super().__init__(in_shape, (self.n_coils, *img))
        self.maps = m
        self._k = len(img)
        self._m = TensorCache(m)
        if set_axis is None:
            with torch.no_grad():
                self._s = TensorCache((m.real**2 + m.imag**2).sum(0))

    def _forward(self, x):
        k = self._k
        if self.n_sets is None:
            return x.unsqueeze(-k - 1) * self._m.like(x)
        return (x.unsqueeze(-k - 1) * self._m.like(x)).sum(dim=-k - 2)

    def _adjoint(self, y):
        k = self._k
        if self.n_sets is None:
            return (y * self._m.like(y).conj()).sum(dim=-k - 1)
        return (y.unsqueeze(-k - 2) * self._m.like(y).conj()).sum(dim=-k - 1)

    def _normal(self, x):
        if self.maps.requires_grad or self.n_sets is not None:  # no diagonal shortcut
            return self._adjoint(self._forward(x))
        if not x.is_complex():
            x = x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        return x * self._s.like(x)

    def __repr__(self) -> str:
        sets = "" if self.n_sets is None else f", sets={self.n_sets}"
        return f"Sense(coils={self.n_coils}{sets}, image={self.ishape[-self._k :]})"
