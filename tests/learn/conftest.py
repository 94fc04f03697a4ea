"""Small multi-coil problems shared by the learn tests."""

import pytest
import torch

from qmrkit import ops


def make_problem(shape=(16, 16), n_coils=3, batch=1, dtype=torch.complex128, seed=0, device="cpu"):
    """Cartesian SENSE operator ``Mask·FFT·Sense`` with smooth random maps, and data ``y = A x``."""
    g = torch.Generator().manual_seed(seed)
    nd = len(shape)
    maps = torch.randn((n_coils, *shape), generator=g, dtype=dtype) * 0.3 + 1
    maps = maps / (maps.abs() ** 2).sum(0).sqrt()
    mask = torch.rand((*shape[:-1], 1), generator=g) < 0.5
    c = shape[-2] // 2
    mask[..., c - 2 : c + 2, :] = True
    full = (n_coils, *shape)
    axes = tuple(range(-nd, 0))
    A = (
        ops.Mask(mask.to(device), shape=full)
        @ ops.FFT(full, axes=axes)
        @ ops.Sense(maps.to(device))
    )
    x = torch.randn((batch, *shape), generator=g, dtype=dtype).to(device)
    y = A(x)
    return A, x, y


@pytest.fixture
def problem2d():
    return make_problem()
