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
    assert a.matrix_size == b.matrix_size and b.meta.pop("source") == "stream"
    assert a.meta.pop("path") == str(tmp_path / "s.h5") and a.meta == b.meta
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


# ------------------------------------------------------- round trips per trajectory kind, 2D/3D
SCHEDULE_TRS = 40


def _mrf_2d():
    from qmrkit.mrf import fisp_schedule

    return sim.mrf_scan(
        (24, 20), n_coils=2, schedule=fisp_schedule(SCHEDULE_TRS), n_interleaves=8, seed=1
    )


def _mrf_3d():
    from qmrkit.mrf import fisp_schedule

    return sim.mrf_scan_3d(
        (4, 16, 16), n_coils=2, schedule=fisp_schedule(SCHEDULE_TRS), n_interleaves=8, seed=1
    )


def _radial_3d():
    """A 3D koosh-ball-like scan: 3-column trajectory, kz off the partition grid (no stack)."""
    g = torch.Generator().manual_seed(0)
    traj = torch.rand(6 * 20, 3, generator=g) - 0.5
    k = torch.randn(3, 6 * 20, dtype=torch.complex64, generator=g)
    scan = RawScan(
        header="",
        kdata=k,
        traj=traj,
        noise=torch.randn(3, 64, dtype=torch.complex64, generator=g),
        matrix_size=(6, 8, 10),
        recon_size=(6, 8, 10),
        fov_mm=(30.0, 40.0, 50.0),
        trajectory="radial",
        meta={"samples_per_readout": 20},
    )
    from qmrkit.io import attach_header

    return attach_header(scan)


KINDS = {
    "cartesian2d": lambda: sim.raw_scan((32, 24), n_coils=3, acceleration=2, calib=8),
    "cartesian3d": lambda: sim.raw_scan(
        (12, 16, 20), n_coils=3, acceleration=(2, 2), calib=6, mask_kind="caipi"
    ),
    "radial2d": lambda: sim.raw_scan((32, 32), n_coils=3, trajectory="radial", n_spokes=12),
    "radial3d": _radial_3d,
    "spiral2d-mrf": _mrf_2d,
    "stack-of-spirals3d-mrf": _mrf_3d,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_write_read_round_trip_per_kind(tmp_path, kind):
    """write_mrd → read_mrd gives back the scan: data, trajectory, mask, noise, header fields,
    encoding limits, geometry, MRF frames and schedule; and the header is the scan's own."""
    from qmrkit.io import header_for_scan
    from qmrkit.mrf import schedule_from_header

    s = KINDS[kind]()
    r = read_mrd(write_mrd(tmp_path / "scan.h5", s))
    assert r.header == s.header == header_for_scan(s)  # sims' headers agree with their scan
    assert r.matrix_size == s.matrix_size and r.recon_size == s.recon_size
    assert r.fov_mm == pytest.approx(s.fov_mm, rel=1e-12)
    assert r.recon_fov_mm == pytest.approx(s.recon_fov_mm or s.fov_mm, rel=1e-12)
    assert r.slice_thickness_mm == s.slice_thickness_mm
    assert r.trajectory == s.trajectory and r.n_coils == s.n_coils
    assert r.encoding_limits == s.encoding_limits
    assert r.batch_dims == () and r.geometry == (s.geometry or io_geometry().ScanGeometry())
    assert torch.equal(r.kdata, s.kdata)
    assert torch.equal(r.noise, s.noise)
    if s.is_cartesian:
        assert torch.equal(r.mask, s.mask) and torch.equal(r.calib_mask, s.calib_mask)
        assert r.traj is None
    else:
        assert r.traj.shape == s.traj.shape  # 3D stays 3D
        torch.testing.assert_close(r.traj, s.traj, rtol=0, atol=1e-7)  # float32 cycles/FOV
        assert r.meta["samples_per_readout"] == s.meta["samples_per_readout"]
    np.testing.assert_allclose(r.affine, s.affine, rtol=0, atol=1e-5)
    if "schedule" in s.meta:
        assert (r.meta["frames"], r.meta["samples"]) == (s.meta["frames"], s.meta["samples"])
        a, b = schedule_from_header(r.header), s.meta["schedule"]
        for f in ("flip_angles", "tr", "te", "phase"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        assert (a.inversion, a.ti) == (b.inversion, b.ti)


def io_geometry():
    from qmrkit.io import geometry

    return geometry


def test_3d_header_states_the_partitions(tmp_path):
    """The reported defect: a 3D stack of spirals written to a file must keep matrix z."""
    import ismrmrd

    s = _mrf_3d()
    h = ismrmrd.xsd.CreateFromDocument(s.header)
    assert int(h.encoding[0].encodedSpace.matrixSize.z) == 4
    assert h.encoding[0].encodingLimits.kspace_encoding_step_2.maximum == 3
    assert len(h.sequenceParameters.flipAngle_deg) == SCHEDULE_TRS
    r = read_mrd(write_mrd(tmp_path / "s3.h5", s))
    assert r.ndim == 3 and r.traj.shape[-1] == 3


def _acquisitions(path):
    import ismrmrd

    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    return xml, acqs


def test_stream_assembles_3d_mrf_like_the_file(tmp_path):
    from qmrkit.io import scan_from_acquisitions

    path = write_mrd(tmp_path / "s3.h5", _mrf_3d())
    xml, acqs = _acquisitions(path)
    a, b = read_mrd(path), scan_from_acquisitions(xml, acqs)
    assert torch.equal(a.kdata, b.kdata) and torch.equal(a.traj, b.traj)
    assert (b.meta["frames"], b.meta["samples"]) == (a.meta["frames"], a.meta["samples"])
    # acquisitions arriving out of order (frames interleaved) give the same scan
    shuffled = sorted(acqs[1:], key=lambda q: (int(q.idx.kspace_encode_step_1), q.scan_counter))
    c = scan_from_acquisitions(xml, [acqs[0], *shuffled])
    assert torch.equal(c.kdata, a.kdata) and torch.equal(c.traj, a.traj)


def test_stack_with_in_plane_trajectories_takes_kz_from_the_partition(tmp_path):
    """Stack of spirals as scanners write it: 2-column trajectories, kz from kspace_encode_step_2."""
    import ismrmrd

    from qmrkit.io import scan_from_acquisitions

    s = _mrf_3d()
    xml, acqs = _acquisitions(write_mrd(tmp_path / "s3.h5", s))
    flat = []
    for q in acqs:
        if q.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            flat.append(q)
            continue
        n = ismrmrd.Acquisition.from_array(np.asarray(q.data), np.asarray(q.traj)[:, :2].copy())
        n.idx.kspace_encode_step_2 = q.idx.kspace_encode_step_2
        n.idx.kspace_encode_step_1 = q.idx.kspace_encode_step_1
        n.idx.repetition = q.idx.repetition
        flat.append(n)
    r = scan_from_acquisitions(xml, flat)
    torch.testing.assert_close(r.traj, s.traj, rtol=0, atol=1e-7)
    assert torch.equal(r.kdata, s.kdata)


def test_dimensions_that_disagree_with_the_header_are_errors(tmp_path):
    from qmrkit.io import scan_from_acquisitions
    from qmrkit.io.mrd import _make_header

    s = _mrf_3d()
    xml, acqs = _acquisitions(write_mrd(tmp_path / "s3.h5", s))
    # the reported defect: a 3D scan with a 2D header (matrix z = 1) used to read as 2D
    two_d = _make_header(
        s.matrix_size[1:], s.matrix_size[1:], s.fov_mm[1:], 2, "spiral", {}, base=s.header
    )
    with pytest.raises(DataFileError, match=r"up to 3 but .* z = 1 \(a 2D header for 3D data"):
        scan_from_acquisitions(two_d, acqs)
    for q in acqs:
        q.idx.kspace_encode_step_2 = 0  # even without partition indices: 3 columns ≠ 2D
    with pytest.raises(DataFileError, match=r"z = 1 \(2D\) .* 3-dimensional trajectories"):
        scan_from_acquisitions(two_d, acqs)
    xml, acqs = _acquisitions(tmp_path / "s3.h5")
    # a partition index beyond the matrix / the encoding limits
    acqs[5].idx.kspace_encode_step_2 = 7
    with pytest.raises(DataFileError, match="up to 7 but the header's encoded matrix has z = 4"):
        scan_from_acquisitions(xml, acqs)
    acqs[5].idx.kspace_encode_step_2 = 3  # inside the matrix, but kz says otherwise
    with pytest.raises(DataFileError, match="disagrees with the trajectory's kz"):
        scan_from_acquisitions(xml, acqs)
    xml, acqs = _acquisitions(tmp_path / "s3.h5")
    # a frame with a missing readout: frames of different sample counts
    with pytest.raises(DataFileError, match="frames have different sample counts"):
        scan_from_acquisitions(xml, acqs[:-1])
    # repetitions that do not cover the schedule
    last = int(acqs[-1].idx.repetition)
    with pytest.raises(DataFileError, match=f"{SCHEDULE_TRS} TRs but the acquisitions have"):
        scan_from_acquisitions(xml, [q for q in acqs if int(q.idx.repetition) != last])
    # a 3D header whose 2-column trajectories cannot be placed (no partition limits)
    r2 = _radial_3d()
    r2.traj = r2.traj[:, 1:]
    from qmrkit.errors import ShapeError

    with pytest.raises(ShapeError, match=r"needs \(samples, 3\)"):
        write_mrd(tmp_path / "bad.h5", r2)
