"""Shape arithmetic without torch's symbolic machinery (base layer: imports only NumPy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """The shape ``shapes`` broadcast to (NumPy's rule, the same as torch's).

    ``torch.broadcast_shapes`` is avoided on purpose: in torch 2.13 its first call imports sympy
    (≈1 s), which a one-shot CLI run or a first NUFFT plan would pay.

    Raises
    ------
    ValueError
        The shapes do not broadcast.
    """
    return tuple(int(n) for n in np.broadcast_shapes(*(tuple(int(n) for n in s) for s in shapes)))
