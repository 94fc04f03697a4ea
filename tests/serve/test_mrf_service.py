"""A full MRF session over loopback: B1 map from an earlier connection, maps equal to the direct call."""

import asyncio

import numpy as np
import pytest
import torch

from qmrkit import pipelines, sim
from qmrkit.mrf import epg_fisp, log_grid, schedule_from_header
from qmrkit.serve import DirectoryStore, exchange
from qmrkit.serve.client import read_mrd_file
from qmrkit.serve.mrd_images import array_to_image, image_to_array

from .helpers import BackgroundServer, with_ids

pytestmark = pytest.mark.slow


def _check_server_dictionary(d, sched, b1):
    """The dictionary the server cached is the one ``dictionary_step`` 0.12 and ``b1_step`` 0.1
    define for this schedule: its grids, and the atoms of some of its entries equal to a fresh
    build of those entries alone."""
    np.testing.assert_allclose(np.unique(d.t1.numpy()), log_grid(10, 4000, 0.12), rtol=1e-6)
    np.testing.assert_allclose(np.unique(d.t2.numpy()), log_grid(1, 500, 0.12), rtol=1e-6)
    np.testing.assert_allclose(np.unique(d.b1.numpy()), pipelines.b1_grid(b1, 0.1), rtol=1e-6)
    for k in ("flip_angles", "tr", "te"):
        np.testing.assert_array_equal(getattr(d.schedule, k), getattr(sched, k))
    assert d.schedule.ti == sched.ti
    assert d.energy >= 0.9999  # Dictionary.build's default SVD compression
    idx = torch.linspace(0, d.n_atoms - 1, 7).round().long()
    # the float64 grid values the build simulated (d.t1 etc. hold them rounded to float32)
    t1, t2, b1v = (g[d.grid_index[idx, j].numpy()] for j, g in enumerate(d.grid))
    fresh = epg_fisp(sched, t1, t2, b1v, tol=1e-5)
    norms = torch.linalg.vector_norm(fresh, dim=1)
    np.testing.assert_allclose(d.norms[idx].numpy(), norms.numpy(), rtol=1e-5)
    c = d.project(fresh / norms[:, None])
    c = c / torch.linalg.vector_norm(c, dim=1, keepdim=True)
    np.testing.assert_allclose(c.numpy(), d.coeffs[idx].numpy(), atol=1e-5)


def test_mrf_over_the_wire_equals_direct_pipeline(tmp_path):
    from qmrkit.io.mrd import read_mrd, write_mrd

    scan = sim.mrf_scan((48, 48), n_coils=2, schedule=None, b1_amplitude=0.2, seed=3)
    path = write_mrd(tmp_path / "mrf.h5", scan)
    header, acqs, _ = read_mrd_file(path)
    header = with_ids(header)  # a stored calibration needs subject/device/session ids
    b1 = scan.meta["truth"]["B1"].T.astype(np.float32)  # NIfTI (x, y) order, as images are
    params = {"dictionary_step": 0.12, "b1_step": 0.1}
    with BackgroundServer(store=DirectoryStore(tmp_path / "store")) as srv:
        r = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="store-b1",
                header_xml=header,
                images=[array_to_image(b1, series_index=0)],
            )
        )
        assert not r.errors, r.texts
        reply = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="mrf",
                header_xml=header,
                acquisitions=acqs,
                parameters=params,
            )
        )
    assert not reply.errors, reply.texts
    assert "mrf: using the stored B1 map" in reply.texts
    got = {str(im.meta["SeriesDescription"]): image_to_array(im) for im in reply.images}
    # the same computation called directly, with the dictionary the server built (checked to be
    # the one these parameters define: grids, and atoms equal to a fresh EPG simulation of a few
    # of its entries) rather than a second identical build of all ≈ 10,000 atoms
    from qmrkit.serve import handlers

    sched = schedule_from_header(header)
    (d,) = handlers._DICTIONARY_CACHE.values()
    _check_server_dictionary(d, sched, b1)
    direct = pipelines.mrf_maps(read_mrd(path), dictionary=d, b1_map=b1, schedule=sched)
    ref_t1 = np.nan_to_num(direct.t1.numpy())  # maps are NIfTI order, like MRD images
    np.testing.assert_allclose(got["qmrkit_T1map"], ref_t1, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(
        got["qmrkit_T2map"], np.nan_to_num(direct.t2.numpy()), rtol=1e-5, atol=1e-3
    )


def test_3d_mrf_over_the_wire_returns_one_image_per_partition(tmp_path):
    """A 3D stack of spirals (8 partitions) streamed to `mrf` with a stored 3D B1 map: one image
    per partition and map (image_index = partition), equal to the in-process pipeline."""
    from qmrkit.io.geometry import ScanGeometry
    from qmrkit.io.mrd import read_mrd, write_mrd
    from qmrkit.serve import handlers

    scan = sim.mrf_scan_3d((8, 24, 24), n_coils=2, b1_amplitude=0.2, seed=3)
    c, s = np.cos(0.4), np.sin(0.4)  # an oblique slab, so the map planes' geometry is checked
    scan.geometry = ScanGeometry((5.0, -7.0, 20.0), (c, s, 0.0), (-s, c, 0.0), (0.0, 0.0, 1.0))
    path = write_mrd(tmp_path / "mrf3d.h5", scan)
    header, acqs, _ = read_mrd_file(path)
    header = with_ids(header)  # a stored calibration needs subject/device/session ids
    b1 = scan.meta["truth"]["B1"].transpose(2, 1, 0).astype(np.float32)  # (x, y, z)
    params = {"dictionary_step": 0.12, "b1_step": 0.1}
    with BackgroundServer(store=DirectoryStore(tmp_path / "store")) as srv:
        r = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="store-b1",
                header_xml=header,
                images=[array_to_image(b1, series_index=0)],
            )
        )
        assert not r.errors, r.texts
        reply = asyncio.run(
            exchange(
                "127.0.0.1",
                srv.port,
                config="mrf",
                header_xml=header,
                acquisitions=acqs,
                parameters=params,
            )
        )
    assert not reply.errors, reply.texts
    assert "mrf: using the stored B1 map" in reply.texts
    got: dict[str, dict[int, np.ndarray]] = {}
    for im in reply.images:
        got.setdefault(str(im.meta["SeriesDescription"]), {})[int(im.image_index)] = image_to_array(
            im
        )
    assert sorted(got["qmrkit_T1map"]) == list(range(8))
    t1 = np.stack([got["qmrkit_T1map"][p] for p in range(8)], axis=-1)
    t2 = np.stack([got["qmrkit_T2map"][p] for p in range(8)], axis=-1)
    assert t1.shape == (24, 24, 8)
    # the in-process pipeline on the same file, with the dictionary the server built (checked to
    # be the one these parameters define) rather than a second identical build
    (d,) = handlers._DICTIONARY_CACHE.values()
    _check_server_dictionary(d, schedule_from_header(header), b1)
    direct = pipelines.mrf_maps(read_mrd(path), dictionary=d, b1_map=b1)
    np.testing.assert_allclose(t1, np.nan_to_num(direct.t1.numpy()), rtol=1e-5, atol=1e-3)
    # the partition images carry where they lie: stacked again (as `serve --send-to` does before
    # writing DICOM) they have the affine `qmrkit mrf` writes its NIfTI/DICOM maps with
    from qmrkit.serve.pacs_out import maps_from_images

    vols = {v.name: v for v in maps_from_images(reply.images)}
    np.testing.assert_array_equal(vols["T1map"].array, t1)
    assert vols["T1map"].unit == "ms" and vols["B1map"].unit == "fraction"
    np.testing.assert_allclose(vols["T1map"].affine, read_mrd(path).affine, atol=1e-4)
    np.testing.assert_allclose(t2, np.nan_to_num(direct.t2.numpy()), rtol=1e-5, atol=1e-3)
