"""Calibrations kept by the service are used, checked, and never cross subjects.

- a stored noise scan prewhitens a later scan exactly as the scan's own noise acquisitions would;
- a stored noise scan of another channel count is skipped, and the reply says so;
- ``store-b1`` refuses maps with implausible values or the wrong shape, storing nothing;
- a header without subject/device/session ids stores and receives no calibration.
"""

import asyncio

import ismrmrd
import numpy as np
import pytest

from qmrkit import models
from qmrkit.io.mrd import read_mrd
from qmrkit.recon import reconstruct
from qmrkit.serve import DirectoryStore, exchange
from qmrkit.serve.client import read_mrd_file
from qmrkit.serve.store import DependencyKey, find_dependency
from qmrkit.sim import raw_scan

from .helpers import BackgroundServer, header_xml, series_images, with_ids


def _split(acqs):
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    return noise, [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


def _send(port, config, header, acquisitions=(), images=(), parameters=None):
    return asyncio.run(
        exchange(
            "127.0.0.1",
            port,
            config=config,
            header_xml=header,
            acquisitions=list(acquisitions),
            images=list(images),
            parameters=parameters,
        )
    )


def _magnitude(reply):
    mag = [im for im in reply.images if int(im.image_series_index) == 1]
    assert len(mag) == 1, reply.texts
    return np.asarray(mag[0].data)[0, 0], mag[0].meta["ImageComment"]


@pytest.fixture
def scan_file(tmp_path):
    path = tmp_path / "scan.h5"
    raw_scan(
        (48, 48), n_coils=4, acceleration=2, calib=16, noise_correlation=0.4, seed=7, path=path
    )
    return path


def test_stored_noise_prewhitens_like_the_scans_own_noise(tmp_path, scan_file):
    xml, acqs, _ = read_mrd_file(scan_file)
    noise, imaging = _split(acqs)
    hdr_noise = with_ids(xml, measurement="M-7")
    hdr_scan = with_ids(xml, measurement="M-8", dependencies=[("Noise", "M-7")])
    with BackgroundServer(store=DirectoryStore(tmp_path / "store")) as srv:
        r = _send(srv.port, "store-noise", hdr_noise, noise)
        assert not r.errors and "stored noise statistics of 4 channels as M-7" in r.texts[0]
        own = _send(srv.port, "sense", hdr_scan, noise + imaging)  # noise in the same stream
        stored = _send(srv.port, "sense", hdr_scan, imaging)  # noise only in the store
        # no dependency list: found by subject/device/session
        by_key = _send(srv.port, "sense", with_ids(xml, measurement="M-9"), imaging)
        # the same scan without ids: nothing stored is used, and the reply says why
        anon = _send(srv.port, "sense", with_ids(xml, patient=None), imaging)
    for r in (own, stored, by_key, anon):
        assert not r.errors, r.texts
    img_own, c_own = _magnitude(own)
    img_stored, c_stored = _magnitude(stored)
    assert c_own == "prewhitened with the scan's own noise (4 channels)"
    assert c_stored == "prewhitened with stored noise M-7 (4 channels)"
    assert "sense: prewhitened with stored noise M-7 (4 channels)" in stored.texts
    np.testing.assert_allclose(img_stored, img_own, rtol=1e-5, atol=1e-6 * img_own.max())
    # and both equal the in-process reconstruction of the file (which has the noise scan)
    ref = np.abs(reconstruct(read_mrd(scan_file), "sense")[0].image.numpy())
    np.testing.assert_allclose(img_own, ref, rtol=1e-5, atol=1e-6 * ref.max())
    img_key, c_key = _magnitude(by_key)
    assert c_key == "prewhitened with stored noise M-7 (4 channels)"
    np.testing.assert_allclose(img_key, img_own, rtol=1e-5, atol=1e-6 * img_own.max())
    img_anon, c_anon = _magnitude(anon)
    assert c_anon.startswith("not prewhitened: no noise acquisitions in the stream; no stored")
    assert "lacks subjectInformation/patientID" in c_anon
    # whitening mattered: the unwhitened image is in other units and shape
    assert not np.allclose(img_anon, img_own, rtol=1e-2)


def test_stored_noise_of_another_channel_count_is_skipped_and_said(tmp_path, scan_file):
    xml, acqs, _ = read_mrd_file(scan_file)
    _, imaging = _split(acqs)
    rng = np.random.default_rng(0)
    eight = ismrmrd.Acquisition.from_array(
        (rng.standard_normal((8, 512)) + 1j * rng.standard_normal((8, 512))).astype(np.complex64)
    )
    eight.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    with BackgroundServer(store=DirectoryStore(tmp_path / "store")) as srv:
        r = _send(srv.port, "store-noise", with_ids(xml, measurement="N-8ch"), [eight])
        assert "8 channels" in r.texts[0]
        reply = _send(srv.port, "sense", with_ids(xml, dependencies=[("Noise", "N-8ch")]), imaging)
    assert not reply.errors, reply.texts
    img, comment = _magnitude(reply)
    assert (
        comment == "not prewhitened: stored noise N-8ch has 8 channels but the scan has 4; skipped"
    )
    assert "sense: " + comment in reply.texts
    scan = read_mrd(scan_file)
    ref = np.abs(reconstruct(scan, "sense", whiten=False)[0].image.numpy())
    np.testing.assert_allclose(img, ref, rtol=1e-5, atol=1e-6 * ref.max())


def _b1_store(tmp_path):
    return DirectoryStore(tmp_path / "store")


def _b1_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "store").rglob("b1-*.npz"))


@pytest.mark.parametrize(
    "value, message",
    [
        (5.0, "1 of 48 non-zero voxels are non-finite or outside (0.2, 3.0)"),
        (0.1, "1 of 48 non-zero voxels are non-finite or outside (0.2, 3.0)"),
        (np.nan, "1 non-finite"),
        (np.inf, "1 non-finite"),
    ],
)
def test_store_b1_refuses_implausible_values(tmp_path, value, message):
    b1 = np.ones((8, 6), np.float32)
    b1[3, 2] = value
    # built with ismrmrd directly: qmrkit's own array_to_image would turn NaN/inf into 0
    image = ismrmrd.Image.from_array(np.ascontiguousarray(b1.T[None, None]), transpose=False)
    with BackgroundServer(store=_b1_store(tmp_path)) as srv:
        r = _send(srv.port, "store-b1", header_xml(matrix=(8, 6, 1)), images=[image])
    assert r.errors and r.errors[0].startswith("error: store-b1 refused") and message in r.errors[0]
    assert _b1_files(tmp_path) == []


def test_store_b1_accepts_zero_background_and_percent(tmp_path):
    b1 = np.zeros((8, 6), np.float32)
    b1[2:6, 1:5] = np.linspace(0.7, 1.3, 16).reshape(4, 4)
    store = _b1_store(tmp_path)
    with BackgroundServer(store=store) as srv:
        r = _send(
            srv.port, "store-b1", header_xml(matrix=(8, 6, 1)), images=series_images(b1[..., None])
        )
        assert not r.errors, r.texts
        r = _send(
            srv.port,
            "store-b1",
            header_xml(matrix=(8, 6, 1), measurement="B1-pct"),
            images=series_images(100 * b1[..., None]),
            parameters={"units": "percent"},
        )
        assert not r.errors, r.texts
    key = DependencyKey("PAT-123", "SCANNER-1", "FOR-1")
    np.testing.assert_array_equal(store.get(key, "b1", "M-1").arrays["b1"], b1)
    np.testing.assert_allclose(store.get(key, "b1", "B1-pct").arrays["b1"], b1, rtol=1e-6)


def test_store_b1_refuses_the_wrong_shape(tmp_path):
    b1 = np.ones((8, 6), np.float32)
    with BackgroundServer(store=_b1_store(tmp_path)) as srv:
        # the map in (y, x) order: named as such
        r = _send(
            srv.port,
            "store-b1",
            header_xml(matrix=(8, 6, 1)),
            images=series_images(b1.T[..., None]),
        )
        assert r.errors and "(6, 8) but the header's reconSpace matrix is (8, 6)" in r.errors[0]
        assert "looks like (y, x) order" in r.errors[0]
        r = _send(
            srv.port,
            "store-b1",
            header_xml(matrix=(16, 16, 1)),
            images=series_images(b1[..., None]),
        )
        assert r.errors and "(8, 6) but the header's reconSpace matrix is (16, 16)" in r.errors[0]
        assert "(y, x)" not in r.errors[0]
    assert _b1_files(tmp_path) == []


@pytest.mark.parametrize("missing", ["patient", "device", "session"])
def test_calibrations_without_ids_are_refused(tmp_path, missing, scan_file):
    xml, acqs, _ = read_mrd_file(scan_file)
    noise, _ = _split(acqs)
    b1 = np.ones((8, 6), np.float32)
    ids = {missing: ""}
    with BackgroundServer(store=_b1_store(tmp_path)) as srv:
        r = _send(
            srv.port,
            "store-b1",
            header_xml(matrix=(8, 6, 1), **ids),
            images=series_images(b1[..., None]),
        )
        assert r.errors and r.errors[0].startswith("error: store-b1 refused: the MRD header lacks")
        r = _send(srv.port, "store-noise", with_ids(xml, **{missing: None}), noise)
        assert r.errors and r.errors[0].startswith("error: store-noise refused: the MRD header")
    assert list((tmp_path / "store").rglob("*.npz")) == []


def test_b1_of_one_subject_never_reaches_another_or_an_anonymous_scan(tmp_path):
    rng = np.random.default_rng(5)
    shape = (8, 6)
    b1 = rng.uniform(0.7, 1.3, shape).astype(np.float32)
    t1 = rng.uniform(600, 1800, shape)
    fa, tr = [3.0, 8.0, 15.0, 20.0], 15.0
    series = (
        models.VfaT1(fa, tr, b1=b1)
        .simulate({"M0": np.full(shape, 3000.0), "T1": t1})
        .numpy()
        .astype(np.float32)
    )
    store = _b1_store(tmp_path)
    deps = [("B1map", "B1-7")]
    with BackgroundServer(store=store) as srv:
        r = _send(
            srv.port,
            "store-b1",
            header_xml(patient="A", matrix=(8, 6, 1), measurement="B1-7"),
            images=series_images(b1[..., None]),
        )
        assert not r.errors, r.texts
        same = _send(
            srv.port,
            "fit:vfa",
            header_xml(patient="A", tr=[tr], flip=fa, dependencies=deps),
            images=series_images(series),
        )
        other = _send(  # subject B names subject A's B1 measurement: still not found
            srv.port,
            "fit:vfa",
            header_xml(patient="B", tr=[tr], flip=fa, dependencies=deps),
            images=series_images(series),
        )
        anon = _send(
            srv.port,
            "fit:vfa",
            header_xml(patient="", tr=[tr], flip=fa, dependencies=deps),
            images=series_images(series),
        )
    assert "using the stored B1 map" in same.texts
    assert any("names B1-7, which is not in the store" in t for t in other.texts), other.texts
    assert any(
        t.startswith("no stored B1 map used: the MRD header lacks subjectInformation/patientID")
        for t in anon.texts
    )
    for r in (other, anon):
        assert "using the stored B1 map" not in r.texts

    def t1map(r):
        im = next(i for i in r.images if "T1map" in str(i.meta["SeriesDescription"]))
        return np.asarray(im.data)[0, 0].T

    np.testing.assert_allclose(t1map(same), t1, rtol=1e-3)
    for r in (other, anon):  # fitted without B1: biased, so the map really was not used
        assert np.median(np.abs(t1map(r) - t1) / t1) > 0.05
    # the store itself: an incomplete key neither stores nor finds anything
    from qmrkit.errors import ParameterError

    with pytest.raises(ParameterError, match="lacks subjectInformation/patientID"):
        store.put(DependencyKey("", "SCANNER-1", "FOR-1"), "b1", "x", {"b1": b1})
    assert store.get(DependencyKey("", "SCANNER-1", "FOR-1"), "b1") is None
    hdr_b = ismrmrd.xsd.CreateFromDocument(header_xml(patient="B", dependencies=deps))
    assert find_dependency(store, hdr_b, "b1").dependency is None
