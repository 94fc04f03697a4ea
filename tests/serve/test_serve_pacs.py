"""`qmrkit serve --send-to`: every finished map series goes to a real PACS (Orthanc, started on
free loopback ports as in tests/io/test_pacs.py) in the background; a PACS that is down or
silent never delays a reply, is retried a bounded number of times and is counted."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import numpy as np
import pytest

from qmrkit.errors import ParameterError
from qmrkit.pipelines import fit_maps
from qmrkit.serve import Server, exchange
from qmrkit.serve.mrd_images import image_to_array
from qmrkit.sim import MOLLI_TI, molli_series

from ..orthanc import free_port, running_orthanc, stored_instances
from .helpers import BackgroundServer, header_xml, series_images

pytest.importorskip("pynetdicom", reason="C-STORE needs the 'dicom' extra (pynetdicom)")
pytest.importorskip("highdicom", reason="Parametric Maps need the 'dicom' extra (highdicom)")

AET = "QMRKITSERVE"
UNITS = {"T1map": "ms", "T1starmap": "ms", "Amap": "[arb'U]", "Bmap": "[arb'U]"}
# an oblique slice (LPS directions, as MRD images carry them), FOV 240 x 200 mm, 6 mm thick
READ = np.array([np.cos(0.3), np.sin(0.3), 0.0])
PHASE = np.array([-np.sin(0.3) * np.cos(0.2), np.cos(0.3) * np.cos(0.2), np.sin(0.2)])
POSITION = np.array([3.0, -4.0, 12.5])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), AET) as o:
        yield o


def _molli(seed=0, shape=(12, 10)):
    t1 = np.random.default_rng(seed).uniform(500, 1800, shape)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=80, seed=seed)
    series[:2, :3] = 0.0  # background, so that the auto mask leaves voxels out (NaN -> 0)
    return series.astype(np.float32)


def _images(series):
    images = series_images(series)
    for im in images:
        im.field_of_view[:] = [240.0, 200.0, 6.0]
        im.position[:] = POSITION.tolist()
        im.read_dir[:] = READ.tolist()
        im.phase_dir[:] = PHASE.tolist()
        im.slice_dir[:] = np.cross(READ, PHASE).tolist()
    return images


def _maps(reply):
    out = {}
    for im in reply.images:
        name = im.meta["SeriesDescription"]
        out[(name[0] if isinstance(name, list) else name).removeprefix("qmrkit_")] = image_to_array(
            im
        )
    return out


def _metric(server, result):
    return server.metrics.pacs_sends.labels(result)._value.get()


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_fit_session_maps_reach_orthanc_equal_to_reply_and_fit_maps(orthanc):
    series = _molli()
    with BackgroundServer(send_to=orthanc["pacs"], calling_aet="QMRKIT-CI") as srv:
        reply = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="fit:molli",
                header_xml=header_xml(ti=MOLLI_TI, patient="PAT-PACS-1"),
                images=_images(series),
            )
        )
        server = srv.server
    # leaving the block drained the server: queued sends are finished within the grace period
    assert not reply.errors, reply.texts
    assert any(f"maps queued for PACS {AET}" in t for t in reply.texts), reply.texts
    assert server.pacs.counts == {"sent": 1, "failed": 0, "dropped": 0, "abandoned": 0}
    assert _metric(server, "sent") == 1 and _metric(server, "failed") == 0
    text = server.metrics.exposition().decode()
    assert 'qmrkit_pacs_sends_total{result="sent"} 1.0' in text
    replied = _maps(reply)
    ref = fit_maps(series, "molli", {"ti": list(MOLLI_TI)}, mask="auto")
    stems = ref.map_names
    assert set(replied) == set(UNITS) == {stems[k] for k in ref.maps}
    stored = stored_instances(orthanc["url"])
    assert len(stored) == 8  # 4 maps x (Parametric Map + MR)
    every = [ds for v in stored.values() for ds in v]
    # one study and one frame of reference for all maps; the header's "FOR-1" is not a UID,
    # so a valid UID derived from it stands in
    assert len({ds.StudyInstanceUID for ds in every}) == 1
    (frame,) = {ds.FrameOfReferenceUID for ds in every}
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)+", frame) and len(frame) <= 64
    for key, m in ref.maps.items():
        name, unit = stems[key], UNITS[stems[key]]
        truth = replied[name].T  # NIfTI (x, y) -> DICOM (rows = y, cols = x)
        (pm,) = stored[f"{name} [{unit}] qmrkit PMAP"]
        assert pm.PatientID == "PAT-PACS-1"
        rwv = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert rwv.MeasurementUnitsCodeSequence[0].CodeValue == unit
        values = pm.pixel_array * float(rwv.RealWorldValueSlope) + float(
            rwv.RealWorldValueIntercept
        )
        # exactly the float32 map the client received, and fit_maps' map in-process
        np.testing.assert_array_equal(values.astype(np.float32), truth)
        np.testing.assert_allclose(values, np.nan_to_num(m.numpy()).T, rtol=1e-6, atol=1e-6)
        assert np.isnan(m.numpy()).sum() >= 6 and (values == 0).sum() >= 6  # masked voxels
        (mr,) = stored[f"{name} [{unit}] qmrkit MR"]
        slope = float(mr.RescaleSlope)
        err = np.abs(mr.pixel_array * slope + float(mr.RescaleIntercept) - truth).max()
        assert err <= slope / 2 * (1 + 1e-6)
        # geometry: DICOM orientation is LPS like MRD; the first voxel lies half the FOV back
        # from the image's centre position (centre voxel index n // 2, as qmrkit places it)
        np.testing.assert_allclose(
            [float(v) for v in mr.ImageOrientationPatient], [*READ, *PHASE], atol=1e-6
        )
        np.testing.assert_allclose([float(v) for v in mr.PixelSpacing], [20.0, 20.0], atol=1e-6)
        corner = POSITION - READ * 20.0 * 6 - PHASE * 20.0 * 5
        np.testing.assert_allclose([float(v) for v in mr.ImagePositionPatient], corner, atol=1e-4)


class _SilentPacs:
    """A TCP port that accepts connections and never answers (a hung PACS)."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return f"pacs://HUNG@127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()


def test_down_pacs_never_delays_a_reply_and_is_counted():
    series = _molli(seed=1)
    closed = f"pacs://DOWN@127.0.0.1:{free_port()}"
    options = {"retries": 2, "backoff_s": 0.2, "timeout_s": 5}
    with BackgroundServer(send_to=closed, pacs_options=options) as srv:
        reply = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="fit:molli",
                header_xml=header_xml(ti=MOLLI_TI),
                images=_images(series),
            )
        )
        assert not reply.errors and any("maps queued for PACS DOWN" in t for t in reply.texts)
        ref = fit_maps(series, "molli", {"ti": list(MOLLI_TI)}, mask="auto")
        np.testing.assert_allclose(
            _maps(reply)["T1map"], np.nan_to_num(ref.maps["T1"].numpy()), rtol=1e-6, atol=1e-6
        )
        server = srv.server
        assert _wait(lambda: _metric(server, "failed") == 1), server.pacs.counts
        assert server.metrics.pacs_retries._value.get() == 2  # 3 attempts, bounded
        assert server.pacs.pending == 0 and _metric(server, "sent") == 0
        # the server serves on
        r = asyncio.run(exchange("127.0.0.1", srv.port, config="null", header_xml=header_xml()))
        assert "null pipeline" in r.texts[0]


def test_hung_pacs_stalls_no_session_and_shutdown_keeps_its_grace():
    series = _molli(seed=2, shape=(6, 5))
    with _SilentPacs() as hung:
        options = {"retries": 5, "backoff_s": 0.1, "timeout_s": 3}
        bg = BackgroundServer(send_to=hung, pacs_options=options)
        with bg as srv:
            server = srv.server
            first = asyncio.run(
                exchange(
                    "127.0.0.1",
                    srv.port,
                    config="fit:molli",
                    header_xml=header_xml(ti=MOLLI_TI),
                    images=_images(series),
                )
            )
            assert not first.errors and server.pacs.pending == 1  # waiting on the hung PACS
            t0 = time.perf_counter()
            other = asyncio.run(
                exchange(
                    "127.0.0.1",
                    srv.port,
                    config="fit:molli",
                    header_xml=header_xml(ti=MOLLI_TI),
                    images=_images(series),
                )
            )
            took = time.perf_counter() - t0
            assert not other.errors and len(other.images) == 4
            assert took < 2.5, f"a session took {took:.2f} s while the PACS hung"  # < timeout_s
            assert server.pacs.pending == 2
            # shutdown: the grace period bounds the wait for the PACS, then the rest is given up
            t0 = time.perf_counter()
            asyncio.run_coroutine_threadsafe(server.drain(1.0), bg.loop).result(30)
            waited = time.perf_counter() - t0
            assert 0.9 < waited < 3.0, waited
            assert _wait(lambda: server.pacs.pending == 0, 10), server.pacs.counts
            assert server.pacs.counts["abandoned"] == 2 and server.pacs.counts["sent"] == 0
            assert server.max_loop_lag < 0.5


def test_bad_pacs_address_fails_at_start(capsys):
    from qmrkit.cli import main

    for bad in ("http://x", "pacs://host:4242", "pacs://A@h:99999"):
        with pytest.raises(ParameterError, match="pacs://"):
            Server(send_to=bad)
    with pytest.raises(ParameterError, match="DICOM kind"):
        Server(send_to="pacs://A@127.0.0.1:4242", dicom_kind="png")
    assert main(["serve", "--port", "0", "--send-to", "pacs://host:4242"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a PACS address pacs://AET@host:port" in err


def _quantitative(value, series_index, affine_shift=0.0):
    from qmrkit.serve.mrd_images import array_to_image

    img = array_to_image(
        np.full((4, 3), value, np.float32),
        series_index=series_index,
        meta={"DataRole": "Quantitative", "SeriesDescription": f"qmrkit_M{series_index}map"},
    )
    img.field_of_view[:] = [8.0, 6.0, 2.0]
    img.position[:] = [affine_shift, 0.0, 0.0]
    img.read_dir[:], img.phase_dir[:], img.slice_dir[:] = [1, 0, 0], [0, 1, 0], [0, 0, 1]
    return img


def test_maps_on_different_grids_still_share_one_study(tmp_path):
    import pydicom

    from qmrkit.serve.pacs_out import PacsJob, write_job

    job = PacsJob(
        header_xml(patient="PAT-2"),
        [_quantitative(1.5, 1), _quantitative(2.5, 2, affine_shift=10.0)],
        "test",
    )
    files = write_job(job, tmp_path, ("mr",))
    sets = [pydicom.dcmread(f) for f in files]
    assert len(sets) == 2 and {float(ds.ImagePositionPatient[0]) for ds in sets} == {-4.0, 6.0}
    assert len({ds.StudyInstanceUID for ds in sets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in sets}) == 1
    assert len({ds.SeriesInstanceUID for ds in sets}) == 2


class _FakeReport:
    def __init__(self, files):
        self.sent, self.failed = list(files), {}


def test_retries_back_off_and_a_full_queue_drops_at_once():
    """The queue's own logic, with a stand-in for send_dicom that fails twice and records when
    it was called (the real C-STORE is tested against Orthanc above)."""
    import threading

    from qmrkit.errors import ServiceError
    from qmrkit.serve.metrics import Metrics
    from qmrkit.serve.pacs_out import PacsForwarder

    calls, gate = [], threading.Event()

    def sender(files, address, *, calling_aet, timeout):
        calls.append(time.monotonic())
        gate.wait(10)  # hold the worker so that the queue fills
        if len(calls) <= 2:
            raise ServiceError("cannot reach the PACS (test)")
        return _FakeReport(files)

    metrics = Metrics()
    fw = PacsForwarder(
        "pacs://X@127.0.0.1:1",
        dicom_kind="mr",
        metrics=metrics,
        max_queue=1,
        retries=2,
        backoff_s=0.2,
        sender=sender,
    )
    fw.start()
    outputs = [_quantitative(1.0, 1), "a text line"]
    assert "maps queued for PACS X" in fw.submit(outputs, header_xml(), "t")
    assert _wait(lambda: len(calls) == 1, 10)  # the worker holds job 1
    assert "maps queued" in fw.submit(outputs, header_xml(), "t")  # job 2 waits in the queue
    t0 = time.monotonic()
    line = fw.submit(outputs, header_xml(), "t")  # job 3: queue full
    assert time.monotonic() - t0 < 0.05 and line.startswith("maps NOT sent to PACS X")
    assert fw.submit(["text only"], header_xml(), "t") is None  # nothing to send
    gate.set()
    assert fw.close(20) == 0
    assert fw.counts == {"sent": 2, "failed": 0, "dropped": 1, "abandoned": 0}
    assert metrics.pacs_retries._value.get() == 2
    gaps = np.diff(calls[:3])
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # backoff 0.2 s, then doubled
    assert metrics.pacs_queue._value.get() == 0


def test_2d_mrf_map_images_lie_where_qmrkit_mrf_puts_its_maps(tmp_path):
    """The geometry the `mrf` pipeline gives its map images (2D, oblique) stacks back to the
    affine of `read_mrd`, which `qmrkit mrf` writes its NIfTI and DICOM maps with."""
    from ismrmrd.xsd import CreateFromDocument

    from qmrkit import sim
    from qmrkit.io.geometry import ScanGeometry
    from qmrkit.io.mrd import read_mrd, write_mrd
    from qmrkit.mrf import fisp_schedule
    from qmrkit.serve.client import read_mrd_file
    from qmrkit.serve.handlers import _mrf_plane_geometry, _scan_from_session
    from qmrkit.serve.mrd_images import array_to_image
    from qmrkit.serve.pacs_out import maps_from_images
    from qmrkit.serve.session import Session

    # a short schedule: only the geometry matters here
    scan = sim.mrf_scan((24, 24), n_coils=1, schedule=fisp_schedule(40, seed=1), seed=1)
    c, s = np.cos(0.5), np.sin(0.5)
    scan.geometry = ScanGeometry((-3.0, 8.0, 41.0), (c, 0.0, s), (0.0, 1.0, 0.0), (-s, 0.0, c))
    path = write_mrd(tmp_path / "mrf.h5", scan)
    header, acqs, _ = read_mrd_file(path)
    session = Session(config="mrf", header_xml=header, acquisitions=acqs)
    session.header = CreateFromDocument(header.encode())
    at = _mrf_plane_geometry(session, _scan_from_session(session))
    img = array_to_image(
        np.ones((24, 24), np.float32),
        series_index=1,
        meta={"DataRole": "Quantitative", "SeriesDescription": "qmrkit_T1map", "Units": "ms"},
        geometry=at(0),
    )
    (vol,) = maps_from_images([img])
    np.testing.assert_allclose(vol.affine, read_mrd(path).affine, atol=1e-4)


def test_isolated_pipelines_forward_their_maps_too(orthanc):
    """With --isolate the maps come back from a worker process (pickled); they are forwarded
    the same way."""
    series = _molli(seed=4, shape=(5, 4))

    def iso(stored):  # this test's instances (the module's Orthanc holds others too)
        return {k: [ds for ds in v if ds.PatientID == "PAT-ISO"] for k, v in stored.items()}

    with BackgroundServer(send_to=orthanc["pacs"], dicom_kind="pmap", isolate=True) as srv:
        reply = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="fit:molli",
                header_xml=header_xml(ti=MOLLI_TI, patient="PAT-ISO"),
                images=_images(series),
            )
        )
        server = srv.server
    assert not reply.errors and any("DICOM pmap)" in t for t in reply.texts), reply.texts
    assert server.pacs.counts["sent"] == 1
    stored = {k: v for k, v in iso(stored_instances(orthanc["url"])).items() if v}
    assert sorted(stored) == sorted(f"{n} [{u}] qmrkit PMAP" for n, u in UNITS.items())
    (pm,) = stored["T1map [ms] qmrkit PMAP"]
    rwv = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    values = pm.pixel_array * float(rwv.RealWorldValueSlope) + float(rwv.RealWorldValueIntercept)
    np.testing.assert_array_equal(values.astype(np.float32), _maps(reply)["T1map"].T)
