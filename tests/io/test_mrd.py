"""ISMRMRD/MRD HDF5: RawScan round trips, images out, corrupt and foreign files."""

import numpy as np
import pytest
import torch

from qmrkit import sim
from qmrkit.errors import DataFileError
from qmrkit.io import RawScan, read_mrd, read_mrd_images, write_mrd, write_mrd_images

pytest.importorskip("ismrmrd", reason="ISMRMRD tests need the 'mrd' extra (ismrmrd, h5py)")
h5py = pytest.importorskip("h5py", reason="ISMRMRD tests need the 'mrd' extra (ismrmrd, h5py)")


@pytest.mark.parametrize(
    "kw",
    [
        {"shape": (32, 24), "acceleration": 2, "calib": 8},
        {"shape": (32, 24), "acceleration": 3, "calib": 8, "separate_calibration": True},
        {"shape": (12, 16, 20), "acceleration": (2, 2), "calib": 6, "mask_kind": "caipi"},
        {"shape": (32, 32), "trajectory": "radial", "n_spokes": 12},
    ],
    ids=["cartesian2d", "separate-calib", "caipi3d", "radial"],
)
def test_raw_scan_round_trip(tmp_path, kw):
    s = sim.raw_scan(n_coils=4, path=tmp_path / "scan.h5", **kw)
    r = read_mrd(tmp_path / "scan.h5")
    assert isinstance(r, RawScan)
    assert r.matrix_size == s.matrix_size and r.recon_size == s.recon_size
    assert r.trajectory == s.trajectory and r.n_coils == 4
    torch.testing.assert_close(r.kdata, s.kdata)
    torch.testing.assert_close(r.noise, s.noise)
    assert r.fov_mm == pytest.approx(s.fov_mm)
    if s.is_cartesian:
        assert torch.equal(r.mask, s.mask)
        assert torch.equal(r.calib_mask, s.calib_mask)
        if s.calib is not None:
            torch.testing.assert_close(r.calib, s.calib)
        assert "kspace_encoding_step_1" in r.encoding_limits
    else:
        torch.testing.assert_close(r.traj, s.traj)
    assert "ismrmrdHeader" in r.header


def test_images_round_trip(tmp_path):
    img = torch.randn(2, 8, 6, dtype=torch.complex64)
    p = write_mrd_images(tmp_path / "img.h5", img, fov_mm=(200.0, 150.0))
    back = read_mrd_images(p)
    np.testing.assert_allclose(back, img.numpy())
    write_mrd_images(p, img.abs()[0], name="magnitude")
    np.testing.assert_allclose(read_mrd_images(p, name="magnitude")[0], img.abs()[0].numpy())
    vol = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    write_mrd_images(tmp_path / "vol.h5", vol, fov_mm=(40.0, 50.0, 60.0))
    np.testing.assert_allclose(read_mrd_images(tmp_path / "vol.h5")[0], vol)


def test_bad_files(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        read_mrd(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not HDF5 at all" * 10)
    with pytest.raises(DataFileError, match="not an HDF5"):
        read_mrd(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(DataFileError, match="no ISMRMRD dataset"):
        read_mrd(other)
    # truncated ISMRMRD file
    good = tmp_path / "good.h5"
    sim.raw_scan((16, 16), n_coils=2, path=good)
    raw = good.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataFileError):
        read_mrd(cut)
    # dataset group without a header
    nohdr = tmp_path / "nohdr.h5"
    with h5py.File(nohdr, "w") as f:
        f.create_group("dataset")
    with pytest.raises(DataFileError, match="header"):
        read_mrd(nohdr)


def test_write_mrd_rejects_batches(tmp_path):
    s = sim.raw_scan((16, 16), n_coils=2)
    s.kdata = s.kdata[None]
    s.batch_dims = ("contrast",)
    from qmrkit.errors import ParameterError

    with pytest.raises(ParameterError):
        write_mrd(tmp_path / "x.h5", s)


@pytest.mark.parametrize("trajectory", ["cartesian", "radial"])
def test_scan_from_acquisitions_equals_file_reader(tmp_path, trajectory):
    """Streamed acquisitions (as the server receives them) assemble exactly like the file."""
    import ismrmrd

    from qmrkit.io import scan_from_acquisitions

    kw = {"n_spokes": 10} if trajectory == "radial" else {"acceleration": 2, "calib": 8}
    sim.raw_scan(shape=(24, 24), n_coils=3, trajectory=trajectory, path=tmp_path / "s.h5", **kw)
    ds = ismrmrd.Dataset(str(tmp_path / "s.h5"), "dataset", create_if_needed=False)
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    a = read_mrd(tmp_path / "s.h5")
    b = scan_from_acquisitions(xml, acqs)
    assert torch.equal(a.kdata, b.kdata) and torch.equal(a.noise, b.noise)
    assert a.matrix_size == b.matrix_size and b.meta == {"source": "stream"}
    if trajectory == "radial":
        assert torch.equal(a.traj, b.traj)
    else:
        assert torch.equal(a.mask, b.mask)
    with pytest.raises(DataFileError, match="stream: the dataset has no acquisitions"):
        scan_from_acquisitions(xml, [])
    with pytest.raises(DataFileError, match="header is missing or invalid"):
        scan_from_acquisitions("<not-ismrmrd/>", acqs)
    with pytest.raises(DataFileError, match="encoding 3 requested"):
        scan_from_acquisitions(xml, acqs, encoding=3)
