"""End to end: sim.raw_scan -> ISMRMRD file -> reconstruct / ``qmrkit recon`` -> NIfTI/PNG/MRD."""

import json

import numpy as np
import pytest
import torch

from qmrkit import recon, sim
from qmrkit.cli import main
from qmrkit.errors import QmrkitWarning
from qmrkit.io import load_nifti, read_mrd, read_mrd_images

from ._helpers import nrmse


def _fit_scale(a, x):
    c = torch.vdot(a.reshape(-1), x.reshape(-1)) / torch.vdot(a.reshape(-1), a.reshape(-1))
    return a * c


@pytest.mark.parametrize("method", ["sense", "tv"])
def test_cli_round_trip_cartesian(tmp_path, method):
    """An ISMRMRD file from sim.raw_scan, reconstructed by ``qmrkit recon``, equals the direct
    recon of the same file (NIfTI, in NIfTI axis order) and is close to the truth."""
    path = tmp_path / "scan.h5"
    s = sim.raw_scan((48, 48), n_coils=8, acceleration=2, calib=16, path=path)
    out = tmp_path / "out"
    assert main(["recon", str(path), "--method", method, "--out", str(out)]) == 0
    mag, affine = load_nifti(out / "recon_mag.nii.gz")
    direct, _ = recon.reconstruct(read_mrd(path), method)
    np.testing.assert_allclose(
        mag,
        direct.to_nifti_order(direct.image.abs().numpy()),
        rtol=1e-4,
        atol=1e-4 * float(mag.max()),
    )
    assert mag.shape == (48, 48)
    assert affine[0, 0] == pytest.approx(220.0 / 48)
    mrd_img = read_mrd_images(out / "recon.h5")
    np.testing.assert_allclose(
        np.abs(mrd_img[0]), direct.image.abs().numpy(), rtol=1e-4, atol=1e-4 * float(mag.max())
    )
    side = json.loads((out / "recon.json").read_text())
    assert side["method"] == method and "prewhiten" in side["settings"]["pipeline"]
    assert (out / "recon.png").stat().st_size > 1000
    # the image is the phantom (in SNR units after prewhitening: compare up to a complex scale)
    assert nrmse(_fit_scale(direct.image, s.meta["truth"]), s.meta["truth"]) < 0.1


@pytest.mark.slow
def test_cli_radial_gridding_and_sense(tmp_path):
    path = tmp_path / "radial.h5"
    s = sim.raw_scan((48, 48), n_coils=8, trajectory="radial", n_spokes=60, path=path)
    for method in ("gridding", "sense"):
        out = tmp_path / method
        assert main(["recon", str(path), "--method", method, "--out", str(out), "--no-figure"]) == 0
        mag, _ = load_nifti(out / "recon_mag.nii.gz")
        assert mag.shape == (48, 48) and np.isfinite(mag).all()
    res, _ = recon.reconstruct(read_mrd(path), "sense")
    # radial never samples the k-space corners (15% of this phantom's energy), hence 0.25
    assert nrmse(_fit_scale(res.image, s.meta["truth"]), s.meta["truth"]) < 0.25


def test_reconstruct_options_and_errors(tmp_path, capsys):
    s = sim.raw_scan((32, 32), n_coils=8, acceleration=2, calib=12, n_noise_samples=0)
    with pytest.warns(QmrkitWarning, match="no noise scan"):
        res, maps = recon.reconstruct(s, "sense", n_virtual=4)
    assert maps.shape[0] == 4 and "coil_compress(4)" in res.settings["pipeline"]
    given, _ = recon.reconstruct(s, "sense", maps=s.meta["maps"], whiten=False)
    assert nrmse(_fit_scale(given.image, s.meta["truth"]), s.meta["truth"]) < 0.1
    with pytest.raises(Exception, match="gridding is for non-Cartesian"):
        recon.reconstruct(s, "gridding")
    # CLI: clear one-line errors, exit status 2
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    assert main(["recon", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err
