"""The automatic object mask (qmrkit.pipelines.masking): the phantom's object exactly, holes as
scipy fills them, no split without a background, and fits equal to fits with the explicit mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from qmrkit import pipelines, sim
from qmrkit.errors import ParameterError, ShapeError
from qmrkit.pipelines.masking import _fill_small_holes, object_mask, resolve_mask


@pytest.fixture(scope="module")
def phantom():
    ph = sim.cardiac_phantom((48, 40))
    series, _ = sim.molli_series(ph["T1"], 1000 * ph["PD"], sim.MOLLI_TI, snr=50)
    return series.astype(np.float32), ph["labels"] > 0


def _exact_otsu(values: np.ndarray) -> float:
    """Otsu's split over every sorted value (no histogram): the reference."""
    v = np.sort(values.astype(np.float64))
    n = v.size
    k = np.arange(1, n)
    c = np.cumsum(v)[:-1]
    m0, m1 = c / k, (v.sum() - c) / (n - k)
    between = k * (n - k) * (m1 - m0) ** 2
    i = int(np.argmax(between))
    return 0.5 * (v[i] + v[i + 1])


def test_phantom_object_is_found_exactly(phantom):
    series, obj = phantom
    m = object_mask(series)
    np.testing.assert_array_equal(m.mask.numpy(), obj)
    rss = np.sqrt((series.astype(np.float64) ** 2).sum(-1))
    # the threshold lies between the background's brightest and the object's darkest voxel
    assert rss[~obj].max() < m.threshold < rss[obj].min()
    assert m.n_voxels == int(obj.sum()) and m.n_filled == 0
    info = m.sidecar()
    assert info["Method"] == "auto" and info["BackgroundFound"] and info["VoxelCount"] == m.n_voxels


def test_threshold_is_otsus_split_within_one_bin():
    """Two overlapping noisy modes (no empty gap): the histogram threshold is within one bin of
    the exact Otsu split computed over every value."""
    rng = np.random.default_rng(3)
    s = np.concatenate([rng.normal(10, 3, 3000), rng.normal(60, 12, 2000)]).clip(0)
    data = s[:, None] * np.ones((1, 1))  # (voxels, 1 measurement)
    m = object_mask(data, max_hole=0)
    ref = _exact_otsu(s)
    width = (np.quantile(s, 0.999) - s.min()) / 256
    assert abs(m.threshold - ref) <= width


def test_small_holes_filled_as_scipy_fills_them():
    rng = np.random.default_rng(1)
    for trial in range(12):
        shape = tuple(rng.integers(5, 30, 2)) if trial % 2 else tuple(rng.integers(4, 12, 3))
        mk = torch.from_numpy(rng.random(shape) < 0.55)
        got = _fill_small_holes(mk, 10**9).numpy()
        ref = ndimage.binary_fill_holes(mk.numpy(), structure=np.ones((3,) * mk.ndim))
        np.testing.assert_array_equal(got, ref)


def test_only_holes_up_to_the_size_limit_are_filled(phantom):
    series, obj = phantom
    s = series.copy()
    s[32:34, 20:22] = 0.0  # 4 voxels inside the body: a small hole
    s[8:20, 10:22] = 0.0  # 144 voxels inside the body: a large dark region (> 1 % of 1920)
    assert obj[32:34, 20:22].all() and obj[8:20, 10:22].all()
    m = object_mask(s).mask.numpy()
    assert m[32:34, 20:22].all()
    assert not m[8:20, 10:22].any()
    assert object_mask(s).n_filled == 4


def test_no_background_keeps_every_voxel():
    """An object filling the field of view (uniformly random amplitudes): Otsu would cut between
    tissues; the guard refuses the split."""
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1, (30, 30, 1)) * np.linspace(1, 0.5, 6)
    m = object_mask(data)
    assert m.threshold is None and m.n_voxels == 900 and bool(m.mask.all())
    assert not m.sidecar()["BackgroundFound"]


def test_complex_tensor_input_and_nan_voxels(phantom):
    series, obj = phantom
    x = torch.from_numpy(series) * torch.exp(1j * torch.tensor(0.7))
    x[3, 4, 2] = float("nan")  # a background voxel
    x[24, 20, 0] = float("nan")  # an object voxel: out of the mask (fits exclude it anyway)
    m = object_mask(x)
    want = obj.copy()
    want[24, 20] = False
    np.testing.assert_array_equal(m.mask.numpy(), want)


def test_bad_arguments():
    with pytest.raises(ShapeError, match="series"):
        object_mask(np.ones(5))
    with pytest.raises(ParameterError, match="background_ratio"):
        object_mask(np.ones((4, 4, 2)), background_ratio=1.5)
    with pytest.raises(ParameterError, match="mask must be 'auto'"):
        resolve_mask("everything", np.ones((4, 4, 2)))


def test_fit_maps_auto_equals_the_explicit_mask(phantom):
    series, obj = phantom
    settings = {"ti": list(sim.MOLLI_TI)}
    auto = pipelines.fit_maps(series, "molli", settings, mask="auto")
    explicit = pipelines.fit_maps(series, "molli", settings, mask=obj)
    t1 = auto.maps["T1"].numpy()
    assert np.isnan(t1[~obj]).all()  # background NaN
    assert np.isfinite(t1[obj]).all()  # every object voxel fitted
    for k in auto.maps:
        np.testing.assert_array_equal(auto.maps[k].numpy(), explicit.maps[k].numpy())
    assert auto.settings["mask"]["VoxelCount"] == int(obj.sum())
    everything = pipelines.fit_maps(series, "molli", settings, mask="none")
    assert everything.n_voxels == obj.size
