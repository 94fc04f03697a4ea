"""Simulation helpers of reconstruction: Shepp–Logan, coil sensitivities, Cartesian masks."""

import numpy as np
import pytest
import torch

from qmrkit.errors import ParameterError, ShapeError
from qmrkit.sim import brain_phantom, cartesian_mask, coil_maps, shepp_logan
from qmrkit.sim.masks import calibration_region


def test_shepp_logan_2d_3d_tissues():
    ph = shepp_logan((64, 64))
    assert ph["image"].shape == ph["T1"].shape == (64, 64)
    assert set(np.unique(ph["labels"])) == {0, 1, 2, 3, 4, 5}
    # classic modified Shepp–Logan intensities: skull 1.0, brain 0.2, ventricles 0.0
    assert ph["image"][48, 32] == pytest.approx(0.2)  # brain, below the centre
    assert ph["image"].max() == pytest.approx(1.0)
    csf = ph["labels"] == 3
    assert np.all(ph["T2"][csf] == 2000.0) and np.all(ph["PD"][ph["labels"] == 0] == 0)
    ph3 = shepp_logan((24, 32, 32))
    assert ph3["image"].shape == (24, 32, 32)
    # the central axial slice of the 3D phantom resembles the 2D one
    assert set(np.unique(ph3["labels"][12])) >= {0, 1, 2, 3}
    with pytest.raises(ShapeError):
        shepp_logan((64,))


@pytest.mark.parametrize("shape", [(48, 40), (16, 24, 20)])
def test_coil_maps_normalised_smooth(shape):
    s = coil_maps(8, shape)
    assert s.shape == (8, *shape) and s.dtype == torch.complex64
    torch.testing.assert_close(s.abs().pow(2).sum(0), torch.ones(shape), atol=1e-5, rtol=0)
    # smooth: neighbouring pixels differ little
    # smooth inside the field of view's inscribed ball (the coils sit just outside its corners)
    ax = [(torch.arange(n) - n / 2) / (n / 2) for n in shape]
    r = torch.sqrt(sum(a**2 for a in torch.meshgrid(*ax, indexing="ij")))
    d = (s[..., 1:] - s[..., :-1]).abs()
    assert d[:, r[..., 1:] < 0.9].max() < 0.15
    # coils differ (not all the same map)
    assert (s[0] - s[1]).abs().mean() > 0.05
    with pytest.raises(ParameterError):
        coil_maps(0, shape)


def test_uniform_mask_2d():
    m = cartesian_mask((64, 32), 4, calib=8)
    assert m.shape == (64, 32) and m.dtype == torch.bool
    assert bool(m[calibration_region((64, 32), 8)].all())
    lines = m[:, 0]
    # every 4th line plus the calibration lines
    expected = {i for i in range(64) if (i - 32) % 4 == 0} | set(range(28, 36))
    assert set(torch.nonzero(lines).flatten().tolist()) == expected
    assert bool((m == m[:, :1]).all())  # readout fully sampled


def test_variable_density_mask_hits_acceleration():
    m = cartesian_mask((128, 16), 5.0, calib=16, kind="variable_density", seed=3)
    assert abs(128 / int(m[:, 0].sum()) - 5.0) < 0.2
    assert bool(m[56:72, 0].all())
    m2 = cartesian_mask((128, 16), 5.0, calib=16, kind="variable_density", seed=3)
    assert torch.equal(m, m2)  # reproducible for a seed
    m3 = cartesian_mask((32, 32, 8), 6.0, calib=8, kind="variable_density")
    assert abs(32 * 32 / int(m3[..., 0].sum()) - 6.0) < 0.3


def test_caipi_mask_3d():
    m = cartesian_mask((16, 16, 4), (2, 2), calib=0, kind="caipi")
    pe = m[..., 0]
    assert int(pe.sum()) == 64  # R = 4
    kz0 = pe[8]  # kz index 0 (centre): ky lines with (ky - 0) % 2 == 0
    kz2 = pe[10]  # kz = 2 -> shifted by one
    assert torch.equal(torch.roll(kz0, 1), kz2)
    assert not pe[9].any()  # kz odd lines are skipped
    uni = cartesian_mask((16, 16, 4), (2, 2), calib=0)
    assert int(uni[..., 0].sum()) == 64 and not torch.equal(uni, m)


def test_mask_errors():
    with pytest.raises(ParameterError):
        cartesian_mask((32, 32), 2.5)  # uniform needs integers
    with pytest.raises(ParameterError):
        cartesian_mask((32, 32), 2, kind="caipi")
    with pytest.raises(ParameterError):
        cartesian_mask((32, 32), 2, kind="poisson")
    with pytest.raises(ShapeError):
        cartesian_mask((32,), 2)


def test_brain_phantom():
    ph = brain_phantom((96, 96))
    assert set(np.unique(ph["labels"])) == {0, 1, 2, 3, 4, 5}
    assert ph["image"].max() == pytest.approx(1.0)
    wm, gm = ph["labels"] == 5, ph["labels"] == 4
    assert np.all(ph["T1"][wm] == 830.0) and np.all(ph["T1"][gm] == 1330.0)
    # T1-weighted spin echo: white matter brighter than grey matter, CSF darker
    assert ph["image"][wm].mean() > ph["image"][gm].mean() > ph["image"][ph["labels"] == 3].mean()
    ph3 = brain_phantom((20, 32, 32))
    assert ph3["image"].shape == (20, 32, 32) and (ph3["labels"][10] == 5).any()
    with pytest.raises(ShapeError):
        brain_phantom((8,))
