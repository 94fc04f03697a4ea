"""Grid sizes and the centred zero-padding / cropping between image and oversampled grid.

Grid sizes are 2^a·3^b·5^c·7^d (fast FFT sizes), even, at least ``σ·N`` and at least ``2W``.
The image index is centred, ``r = n − N//2``; on a grid of ``G`` cells the value for ``r`` sits at
index ``r mod G`` (so no FFT shift is ever needed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch


def is_smooth(n: int) -> bool:
    """True when ``n`` has no prime factor above 7."""
    for p in (2, 3, 5, 7):
        while n % p == 0 and n > 1:
            n //= p
    return n == 1


def next_smooth(n: int, even: bool = True) -> int:
    """Smallest ``m ≥ n`` of the form 2^a·3^b·5^c·7^d (even when ``even``)."""
    m = max(int(n), 1)
    while not (is_smooth(m) and (not even or m % 2 == 0)):
        m += 1
    return m


def grid_size(n: int, sigma: float, width: int) -> int:
    """Oversampled grid size for an image axis of ``n`` pixels: ≥ σ·n, ≥ 2W, smooth and even."""
    return next_smooth(max(math.ceil(sigma * n - 1e-9), 2 * width, n))


def _pieces(n: int, g: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(image slice, grid slice) pairs for the negative and non-negative centred indices."""
    h = n // 2
    return ((slice(0, h), slice(g - h, g)), (slice(h, n), slice(0, n - h)))


def pad_to_grid(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Place a batch-first image ``(B, *N)`` on a zeroed batch-last grid ``(*G, B)``."""
    nd = len(grid)
    b = x.shape[0]
    n = x.shape[1:]
    out = x.new_zeros((*grid, b))
    xt = x.permute(*range(1, nd + 1), 0)  # (*N, B) view
    for combo in itertools.product(*(_pieces(ni, gi) for ni, gi in zip(n, grid, strict=True))):
        src = tuple(c[0] for c in combo)
        dst = tuple(c[1] for c in combo)
        out[dst] = xt[src]
    return out


def crop_from_grid(g: torch.Tensor, n: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pad_to_grid`'s placement: batch-last grid ``(*G, B)`` -> ``(B, *N)``."""
    nd = len(n)
    grid = g.shape[:nd]
    b = g.shape[nd]
    out = g.new_empty((b, *n))
    ot = out.permute(*range(1, nd + 1), 0)
    for combo in itertools.product(*(_pieces(ni, gi) for ni, gi in zip(n, grid, strict=True))):
        src = tuple(c[1] for c in combo)
        dst = tuple(c[0] for c in combo)
        ot[dst] = g[src]
    return out
