"""DICOM in: series synthesised with pydicom from known arrays and geometry, pydicom's and
nibabel's bundled DICOM files, cross-checked against nibabel.nicom's geometry and scaling."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from qmrkit.errors import DataFileError, DicomError
from qmrkit.io import acquisition_values, is_dicom, read_dicom

from .dicom_files import FLIP, oblique_affine, pydicom, write_classic, write_enhanced

with warnings.catch_warnings():  # nibabel.nicom warns on import that its readers are experimental
    warnings.simplefilter("ignore")
    from nibabel.nicom import dicomwrappers

TI = [100.0, 180.0, 260.0, 1100.0, 1180.0, 1900.0, 2700.0]
NIBABEL_DATA = Path(dicomwrappers.__file__).parent / "tests" / "data"
PYDICOM_DIRS = Path(pydicom.data.get_testdata_file("MR_small.dcm")).parent / "dicomdirtests"


def _stored(shape, seed=0):
    return np.random.default_rng(seed).integers(-200, 3000, size=shape).astype(np.int16)


def _nibabel_world(path: Path, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """RAS position of pixel (column i, row j) of a single-frame file, by nibabel's affine
    (which indexes (row, column) and is LPS)."""
    w = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
    idx = np.stack([j, i, np.zeros_like(i), np.ones_like(i)]).astype(float)
    return (np.diag([*FLIP, 1.0]) @ w.affine @ idx)[:3]


# -- synthesised series ---------------------------------------------------------------------------
def test_classic_oblique_nonsquare_series_matches_truth_and_nibabel(tmp_path):
    aff = oblique_affine()
    stored = _stored((7, 5, 3, len(TI)))
    order = [3, 0, 6, 1, 5, 2, 4]  # files in neither TI nor instance order
    files = write_classic(
        tmp_path / "s",
        stored[..., order],
        aff,
        ti=[TI[m] for m in order],
        slope=0.5,
        intercept=-10.0,
        te=[1.1] * 7,
        tr=2.5,
    )
    s = read_dicom(tmp_path / "s")
    assert s.data.shape == (7, 5, 3, 7) and s.data.dtype == np.float32
    np.testing.assert_allclose(s.affine, aff, atol=1e-6)  # 10-digit DS strings
    np.testing.assert_array_equal(s.data, stored * 0.5 - 10.0)  # sorted by TI, rescaled
    np.testing.assert_array_equal(s.values["ti"], TI)
    assert s.sorted_by == "ti" and s.sources["ti"] == "InversionTime (0018,0082)"
    assert s.settings(["ti", "tr"]) == {"ti": TI, "tr": 2.5}
    assert len(s.files) == 21 and s.reference.PatientID == "QMRKIT-TEST-01"
    assert "PixelData" not in s.reference  # headers only are kept
    # nibabel, file by file: the world position of every pixel and its scaled value
    i, j = np.meshgrid(np.arange(7), np.arange(5), indexing="ij")
    for f in files:
        ds = pydicom.dcmread(f)
        k = int(f.name.split("_")[1])  # the slice it was written for
        m = TI.index(float(ds.InversionTime))
        ours = s.affine @ np.stack([i.ravel(), j.ravel(), np.full(i.size, k), np.ones(i.size)])
        np.testing.assert_allclose(ours[:3], _nibabel_world(f, i.ravel(), j.ravel()), atol=1e-5)
        nib_data = dicomwrappers.wrapper_from_data(ds).get_data()  # (rows, cols), rescaled
        np.testing.assert_allclose(s.data[:, :, k, m], nib_data.T)


def test_stack_against_the_normal_is_resorted(tmp_path):
    """Slices written with z opposite to row × column come back ordered along the normal: the
    same voxels in the same places, the z axis reversed."""
    aff = oblique_affine(left=True)
    stored = _stored((6, 4, 4, 3), seed=1)
    write_classic(tmp_path / "s", stored, aff, ti=TI[:3])
    s = read_dicom(tmp_path / "s")
    expected = aff.copy()
    expected[:3, 2] = -aff[:3, 2]
    expected[:3, 3] = (aff @ [0, 0, 3, 1])[:3]
    np.testing.assert_allclose(s.affine, expected, atol=1e-6)
    np.testing.assert_array_equal(s.data, stored[:, :, ::-1].astype(np.float32))
    assert np.linalg.det(s.affine[:3, :3]) * np.linalg.det(aff[:3, :3]) < 0


def test_single_slice_uses_slice_thickness_and_is_3d(tmp_path):
    aff = oblique_affine(voxel=(1.5, 1.75, 8.0))
    stored = _stored((6, 8, 1, 4), seed=2)
    write_classic(tmp_path / "s", stored, aff, ti=TI[:4])
    s = read_dicom(tmp_path / "s")
    assert s.data.shape == (6, 8, 4)
    np.testing.assert_allclose(s.affine, aff, atol=1e-6)
    np.testing.assert_array_equal(s.data, stored[:, :, 0])


def test_enhanced_multiframe_equals_the_classic_series(tmp_path):
    aff = oblique_affine()
    stored = _stored((7, 5, 3, 4), seed=3)
    ti = [900.0, 100.0, 500.0, 300.0]
    write_enhanced(tmp_path / "e.dcm", stored, aff, ti=ti, slope=2.0, intercept=5.0)
    write_classic(tmp_path / "c", stored, aff, ti=ti, slope=2.0, intercept=5.0)
    e, c = read_dicom(tmp_path / "e.dcm"), read_dicom(tmp_path / "c")
    np.testing.assert_array_equal(e.data, c.data)
    np.testing.assert_allclose(e.affine, c.affine, atol=1e-9)
    np.testing.assert_array_equal(e.values["ti"], sorted(ti))
    np.testing.assert_array_equal(e.data, stored[..., np.argsort(ti)] * 2.0 + 5.0)
    assert e.sources["ti"] == "InversionTimes (0018,9079) in the MR Modifier Sequence"
    assert e.sources["te"].startswith("EffectiveEchoTime (0018,9082)")
    assert e.settings(["tr"]) == {"tr": 2.5} and e.values["flip_angles"][0] == 35.0


def test_sorting_by_echo_time_flip_angle_and_auto(tmp_path):
    aff = oblique_affine()
    stored = _stored((4, 3, 2, 4), seed=4)
    te = [40.0, 10.0, 30.0, 20.0]
    write_classic(tmp_path / "te", stored, aff, te=te, ti=[0.0] * 4)
    s = read_dicom(tmp_path / "te")  # auto: TE is the one that varies
    assert s.sorted_by == "te"
    np.testing.assert_array_equal(s.data, stored[..., np.argsort(te)])
    fa = [15.0, 3.0, 9.0, 6.0]
    write_classic(tmp_path / "fa", stored, aff, fa=fa, tr=[12.0] * 4, te=[2.0] * 4)
    v = read_dicom(tmp_path / "fa", sort_by="flip_angles")
    assert v.settings(["flip_angles", "tr"]) == {"flip_angles": sorted(fa), "tr": 12.0}
    acq = read_dicom(tmp_path / "fa", sort_by="acquisition")  # InstanceNumber order
    nums = [int(pydicom.dcmread(f).InstanceNumber) for f in acq.files]
    assert acq.sorted_by == "acquisition" and len(set(nums)) == 8


def test_ti_from_image_comments_and_fallback(tmp_path):
    aff = oblique_affine()
    stored = _stored((4, 3, 1, 3), seed=5)
    tis = [300, 100, 200]
    write_classic(
        tmp_path / "c", stored, aff, extra=lambda k, m: {"ImageComments": f"T1 MOLLI TI {tis[m]}"}
    )
    s = read_dicom(tmp_path / "c", sort_by="ti")
    assert s.sources["ti"] == "ImageComments (0020,4000)"
    np.testing.assert_array_equal(s.values["ti"], [100, 200, 300])
    np.testing.assert_array_equal(s.data, stored[:, :, 0][..., [1, 2, 0]])
    write_classic(tmp_path / "n", stored, aff)
    with pytest.raises(DicomError, match=r"has no inversion times; looked for InversionTime"):
        read_dicom(tmp_path / "n", sort_by="ti")
    s = read_dicom(tmp_path / "n", sort_by="ti", fallback="acquisition")
    assert s.sorted_by == "acquisition" and "ti" not in s.values
    with pytest.raises(DicomError, match=r"no inversion times in every image \(looked for"):
        s.settings(["ti"])


def test_standard_ge_and_philips_diffusion_tags(tmp_path):
    aff = oblique_affine()
    stored = _stored((4, 3, 1, 3), seed=6)
    b = [1000.0, 0.0, 2000.0]
    g = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])

    def standard(k, m):
        return {"DiffusionBValue": b[m], "DiffusionGradientOrientation": list(g[m])}

    write_classic(tmp_path / "std", stored, aff, extra=standard)
    s = read_dicom(tmp_path / "std")
    assert s.sorted_by == "b" and s.sources["b"] == "DiffusionBValue (0018,9087)"
    np.testing.assert_allclose(s.values["b"], [0.0, 1.0, 2.0])  # ms/µm²
    np.testing.assert_allclose(s.values["bvec"], [[0, 0, 0], [0, 1, 0], [2**-0.5, 2**-0.5, 0]])

    def ge(k, m):  # GE adds 10^9 to the b-values of multi-b scans
        return {(0x0043, "GEMS_PARM_01", 0x39, "IS"): [str(int(b[m]) + 10**9), "0", "0", "0"]}

    write_classic(tmp_path / "ge", stored, aff, extra=ge)
    s = read_dicom(tmp_path / "ge", sort_by="b")
    np.testing.assert_allclose(s.values["b"], [0.0, 1.0, 2.0])
    assert s.sources["b"] == "GE private (0043,xx39) slop_int_6"

    def philips(k, m):
        return {(0x2001, "Philips Imaging DD 001", 0x03, "FL"): b[m]}

    write_classic(tmp_path / "ph", stored, aff, extra=philips)
    s = read_dicom(tmp_path / "ph", sort_by="b")
    assert s.sources["b"].startswith("Philips private (2001,xx03)")
    np.testing.assert_array_equal(s.data, stored[:, :, 0][..., [1, 0, 2]])


def test_siemens_b_value_from_private_tag_and_csa_header():
    path = NIBABEL_DATA / "siemens_dwi_1000.dcm.gz"
    if not path.exists():
        pytest.skip(f"nibabel's test data are not installed ({path})")
    ds = pydicom.dcmread(gzip.open(path))
    v = acquisition_values(ds)
    assert v["b"] == (1.0, "Siemens private (0019,xx0C) B_value")
    g_private = v["bvec"][0]
    del ds[ds.private_block(0x0019, "SIEMENS MR HEADER").get_tag(0x0C)]
    del ds[ds.private_block(0x0019, "SIEMENS MR HEADER").get_tag(0x0E)]
    v = acquisition_values(ds)
    assert v["b"] == (1.0, "Siemens CSA header B_value")
    # two independent records of the same direction (private tag vs CSA header) agree
    np.testing.assert_allclose(v["bvec"][0], g_private, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(g_private), 1.0)


def test_siemens_mosaic_is_refused(tmp_path):
    path = NIBABEL_DATA / "siemens_dwi_1000.dcm.gz"
    if not path.exists():
        pytest.skip(f"nibabel's test data are not installed ({path})")
    (tmp_path / "m.dcm").write_bytes(gzip.open(path).read())
    with pytest.raises(DicomError, match="Siemens mosaic .* dcm2niix"):
        read_dicom(tmp_path / "m.dcm")


# -- files that packages ship ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
)
def test_pydicom_mr_small_matches_nibabel(name):
    path = Path(pydicom.data.get_testdata_file(name))
    s = read_dicom(path)
    w = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
    assert s.data.shape == (64, 64, 1)
    np.testing.assert_array_equal(s.data[..., 0], w.get_data().T)
    # nibabel indexes (row, column): swap its first two columns, then LPS → RAS
    expected = np.diag([*FLIP, 1.0]) @ w.affine[:, [1, 0, 2, 3]]
    expected[:3, 2] *= -1  # nibabel's slice normal is column × row, ours row × column
    np.testing.assert_allclose(s.affine, expected, atol=1e-9)
    assert s.values["te"][0] == pytest.approx(float(pydicom.dcmread(path).EchoTime))


def test_philips_enhanced_mr_matches_nibabel(tmp_path):
    gz = NIBABEL_DATA / "philips_mprage.dcm.gz"
    if not gz.exists():
        pytest.skip(f"nibabel's test data are not installed ({gz})")
    path = tmp_path / "mprage.dcm"
    path.write_bytes(gzip.open(gz).read())
    s = read_dicom(path)
    assert s.data.shape == (256, 256, 176, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no Philips private scale factor
        w = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
        nib_shape = w.image_shape
    # our voxel (i, j, k) and nibabel's voxel M @ (i, j, k) are the same point: M must be a
    # signed permutation with integer shifts that maps our index box onto nibabel's
    m = np.linalg.inv(np.diag([*FLIP, 1.0]) @ w.affine) @ s.affine
    perm = np.round(m[:3, :3])
    # nibabel's slice step is SliceThickness × normal, ours the measured ImagePositionPatient
    # step: they agree to the DS rounding of the positions (~1e-5 mm per mm)
    np.testing.assert_allclose(m[:3, :3], perm, atol=2e-5)
    np.testing.assert_allclose(m[:3, 3], np.round(m[:3, 3]), atol=5e-3)  # 175 slices of that
    assert sorted(np.abs(perm).sum(0)) == [1, 1, 1] and sorted(np.abs(perm).sum(1)) == [1, 1, 1]
    corners = np.array([[i, j, k] for i in (0, 255) for j in (0, 255) for k in (0, 175)]).T
    mapped = np.round(m[:3, :3] @ corners + m[:3, 3:]).astype(int)
    assert (mapped.min(1) == 0).all() and (mapped.max(1) == np.array(nib_shape) - 1).all()
    assert s.values["te"][0] == pytest.approx(3.513) and s.values["flip_angles"][0] == 7.0
    assert s.sources["te"] == "EffectiveEchoTime (0018,9082) in the MR Echo Sequence"
    assert s.values["tr"][0] == pytest.approx(7.56930017471313)


@pytest.mark.filterwarnings("ignore:Unable to find Philips private scale factor")
def test_pydicom_dicomdir_folder_lists_series_and_reads_one():
    folder = PYDICOM_DIRS / "98892003"
    if not folder.exists():
        pytest.skip(f"pydicom's dicomdirtests are not installed ({folder})")
    with pytest.raises(DicomError, match=r"hold 7 series.*FAST LOCALIZER.*ANGIO Projected"):
        read_dicom(folder)
    uid = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.475"
    s = read_dicom(folder, series_uid=uid)
    assert s.series_uid == uid and len(s.files) == 1
    w = dicomwrappers.wrapper_from_data(pydicom.dcmread(s.files[0]))
    np.testing.assert_allclose(s.data[..., 0], w.get_data().T)
    i, j = np.meshgrid([0, 10, s.data.shape[0] - 1], [0, 7, s.data.shape[1] - 1], indexing="ij")
    ours = s.affine @ np.stack([i.ravel(), j.ravel(), 0 * i.ravel(), 1 + 0 * i.ravel()])
    np.testing.assert_allclose(ours[:3], _nibabel_world(s.files[0], i.ravel(), j.ravel()))
    # the 'T/S/C' pilot: three orthogonal planes in one series
    with pytest.raises(DicomError, match="ImageOrientationPatient differs"):
        read_dicom(folder, series_uid="1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.136")
    with pytest.raises(DicomError, match="no series 1.2.3 among"):
        read_dicom(folder, series_uid="1.2.3")


# -- errors -------------------------------------------------------------------------------------
def test_mixed_series_names_both(tmp_path):
    aff = oblique_affine()
    write_classic(tmp_path / "d", _stored((4, 3, 1, 2)), aff, ti=TI[:2], series_uid="1.2.3.4")
    write_classic(
        tmp_path / "d", _stored((4, 3, 1, 2)), aff, ti=TI[:2], series_uid="1.2.3.5", seed=9
    )
    with pytest.raises(DicomError) as err:
        read_dicom(tmp_path / "d")
    msg = str(err.value)
    assert "2 series" in msg and "1.2.3.4 (series 7, 'T1 MOLLI test', 2 file(s))" in msg
    assert "1.2.3.5" in msg and "--series" in msg
    assert read_dicom(tmp_path / "d", series_uid="1.2.3.5").series_uid == "1.2.3.5"


def test_inconsistent_geometry_errors(tmp_path):
    aff = oblique_affine()
    stored = _stored((4, 3, 4, 2))
    # orientation differs: one file rotated
    files = write_classic(tmp_path / "o", stored, aff, ti=TI[:2])
    ds = pydicom.dcmread(files[0])
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.save_as(files[0])
    with pytest.raises(DicomError, match="ImageOrientationPatient differs between images"):
        read_dicom(tmp_path / "o")
    # uneven spacing: the third slice moved 1.5 mm along the normal
    files = write_classic(tmp_path / "u", stored, aff, ti=TI[:2])
    for f in files:
        ds = pydicom.dcmread(f)
        if f.name.split("_")[1] == "3":
            n = np.cross(
                np.array(ds.ImageOrientationPatient[:3], float),
                np.array(ds.ImageOrientationPatient[3:], float),
            )
            ds.ImagePositionPatient = [
                f"{v:.10g}" for v in np.array(ds.ImagePositionPatient, float) + 1.5 * n
            ]
            ds.save_as(f)
    with pytest.raises(DicomError, match=r"uneven slice spacing: gaps \[5, 5, 6.5\] mm"):
        read_dicom(tmp_path / "u")
    # a missing file: one slice has one image fewer
    files = write_classic(tmp_path / "m", stored, aff, ti=TI[:2])
    next(f for f in files if f.name.endswith("_2_1")).unlink()
    with pytest.raises(DicomError, match="different numbers of images"):
        read_dicom(tmp_path / "m")
    # gantry tilt: slices shifted in-plane, step not along the normal
    tilted = aff.copy()
    tilted[:3, 2] += 0.6 * aff[:3, 0]
    write_classic(tmp_path / "t", stored, tilted, ti=TI[:2])
    with pytest.raises(DicomError, match="not stacked along their normal"):
        read_dicom(tmp_path / "t")
    # TIs that differ between slices (slice-by-slice MOLLI) cannot be one ti vector
    write_classic(
        tmp_path / "s", stored, aff, extra=lambda k, m: {"InversionTime": 100 + 10 * k + 500 * m}
    )
    with pytest.raises(DicomError, match="inversion times: the values differ between slices"):
        read_dicom(tmp_path / "s", sort_by="ti")


def test_not_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DicomError, match="no DICOM images in .*1 file"):
        read_dicom(tmp_path)
    with pytest.raises(DicomError, match="is not a DICOM file"):
        read_dicom([tmp_path / "notes.txt"])
    with pytest.raises(DataFileError, match="not found"):
        read_dicom(tmp_path / "missing")
    assert is_dicom(tmp_path) and not is_dicom(tmp_path / "notes.txt")
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), tmp_path / "x")
    assert is_dicom(tmp_path / "x")


def test_missing_pydicom_names_the_extra(monkeypatch, tmp_path):
    from qmrkit.errors import OptionalDependencyError

    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # import pydicom fails
    with pytest.raises(OptionalDependencyError, match=r"pip install 'qmrkit\[dicom\]'"):
        read_dicom(tmp_path)
