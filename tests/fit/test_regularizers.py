"""TotalVariation penalties against direct NumPy sums (separate and coupled, iso/anisotropic)."""

import numpy as np
import pytest
import torch

from qmrkit import fit
from qmrkit.fit.regularizers import RegularizerContext


def _ctx(maps, mask):
    t = {k: torch.tensor(v) for k, v in maps.items()}
    m = torch.tensor(mask)
    return RegularizerContext(maps=t, normalized=t, mask=m, n_voxels=int(mask.sum()))


def _diffs(x, mask):
    """Forward differences per axis, zero unless both voxels are in the mask, padded at the end."""
    out = []
    for ax in range(x.ndim):
        d = np.zeros_like(x)
        sl_hi = [slice(None)] * x.ndim
        sl_lo = [slice(None)] * x.ndim
        sl_hi[ax], sl_lo[ax] = slice(1, None), slice(0, -1)
        valid = mask[tuple(sl_hi)] & mask[tuple(sl_lo)]
        d[tuple(sl_lo)] = np.where(valid, x[tuple(sl_hi)] - x[tuple(sl_lo)], 0.0)
        out.append(d)
    return out


@pytest.mark.parametrize("isotropic", [True, False])
def test_separate_and_coupled_tv_equal_numpy(isotropic):
    rng = np.random.default_rng(0)
    shape = (5, 6, 4)
    maps = {"a": rng.uniform(0, 1, shape), "b": rng.uniform(0, 1, shape)}
    mask = rng.uniform(size=shape) > 0.2
    eps = 1e-4
    da, db = _diffs(maps["a"], mask), _diffs(maps["b"], mask)

    def norm(groups):  # groups: list (per axis) of summed squared differences
        if isotropic:
            return np.sqrt(sum(groups) + eps**2) - eps
        return sum(np.sqrt(g + eps**2) - eps for g in groups)

    n = mask.sum()
    sep = (norm([d * d for d in da])[mask].sum() + norm([d * d for d in db])[mask].sum()) / n
    cpl = norm([x * x + y * y for x, y in zip(da, db, strict=True)])[mask].sum() / n
    ctx = _ctx(maps, mask)
    kw = {"isotropic": isotropic, "eps": eps, "dims": 3}
    got_sep = float(fit.TotalVariation(("a", "b"), 2.0, **kw)(ctx))
    got_cpl = float(fit.TotalVariation(("a", "b"), 2.0, coupled=True, **kw)(ctx))
    np.testing.assert_allclose(got_sep, 2.0 * sep, rtol=1e-12)
    np.testing.assert_allclose(got_cpl, 2.0 * cpl, rtol=1e-12)
    # a shared edge costs less coupled than apart (triangle inequality), never more
    assert got_cpl < got_sep


def test_coupled_tv_of_one_map_is_its_tv():
    rng = np.random.default_rng(1)
    maps = {"a": rng.uniform(0, 1, (6, 7))}
    mask = np.ones((6, 7), dtype=bool)
    ctx = _ctx(maps, mask)
    np.testing.assert_allclose(
        float(fit.TotalVariation("a", 1.0, coupled=True)(ctx)),
        float(fit.TotalVariation("a", 1.0)(ctx)),
        rtol=1e-14,
    )
