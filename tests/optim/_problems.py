"""Small reference problems shared by the solver tests."""

import numpy as np
import torch


def crandn(shape, seed, dtype=torch.complex128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def spd_matrix(n, cond, seed, dtype=np.float64):
    """A random symmetric/Hermitian positive definite matrix with a given condition number."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    if np.issubdtype(dtype, np.complexfloating):
        a = a + 1j * rng.standard_normal((n, n))
    q, _ = np.linalg.qr(a)
    ev = np.geomspace(1.0, cond, n)
    return ((q * ev) @ q.conj().T).astype(dtype)
