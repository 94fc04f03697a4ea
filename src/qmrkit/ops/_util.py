"""Small helpers shared by the concrete operators (not public)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ParameterError, ShapeError


def normalise_axes(axes: Sequence[int] | int | None, ndim: int, what: str) -> tuple[int, ...]:
    """Axes relative to a trailing shape of ``ndim`` dims, as negative indices (batch-proof).

    ``axes`` may use indices ``0..ndim-1`` or ``-ndim..-1``; ``None`` means all of them.
    """
    if axes is None:
        return tuple(range(-ndim, 0))
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ShapeError(
                f"{what}: axis {a} is out of range for a shape with {ndim} dimension(s); "
                f"use 0..{ndim - 1} or -{ndim}..-1"
            )
        out.append(a - ndim if a >= 0 else a)
    if len(set(out)) != len(out):
        raise ParameterError(f"{what}: repeated axes in {tuple(axes)}")
    return tuple(out)


class TensorCache:
    """One stored tensor, with copies cast to the device/dtype an input needs (cached).

    Operators hold their data (masks, maps, weights) on the device they were built on; applying
    them to data elsewhere moves a copy once instead of on every call.
    """

    def __init__(self, t: torch.Tensor):
        self.base = t
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, x: torch.Tensor, complex_ok: bool = True) -> torch.Tensor:
        """The tensor on ``x``'s device, in a dtype that multiplies ``x`` without upcasting."""
        b = self.base
        if b.is_complex():
            dtype = x.dtype if x.is_complex() else _complex_of(x.dtype)
        elif x.is_complex():
            dtype = x.real.dtype
        elif x.is_floating_point():
            dtype = x.dtype
        else:
            dtype = b.dtype if b.is_floating_point() else torch.float32
        key = (x.device, dtype)
        t = self._cache.get(key)
        if t is None:
            t = b.to(device=x.device, dtype=dtype)
            if b.requires_grad:  # keep the graph: never cache a differentiable copy
                return t
            self._cache[key] = t
        return t


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def batch_shape(x: torch.Tensor, n_trailing: int) -> tuple[int, ...]:
    return tuple(x.shape[: x.ndim - n_trailing])
