"""Surface I/O: GIfTI, FreeSurfer geometry / morphometry and MGH round trips, bit for bit, and
shape validation."""

import nibabel as nib
import numpy as np
import pytest
import torch

from qmrkit import io
from qmrkit.errors import DataFileError, ShapeError


def _mesh(seed=0):
    rng = np.random.default_rng(seed)
    coords = rng.normal(0, 30, (50, 3)).astype(np.float32)
    faces = np.stack([rng.permutation(50)[:3] for _ in range(80)]).astype(np.int32)
    return coords, faces


def test_func_gii_round_trip_bit_for_bit_with_metadata(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 1, 50).astype(np.float32)
    values[3] = np.nan  # an unfitted vertex stays NaN
    p = io.write_surface_map(
        tmp_path / "lh.f.func.gii", torch.from_numpy(values), name="f", units="", model="NEXI"
    )
    back = io.read_surface_data(p, n_vertices=50)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back.view(np.uint32), values.view(np.uint32))
    meta = dict(nib.load(str(p)).darrays[0].meta)
    assert meta["Name"] == "f" and meta["Model"] == "NEXI" and meta["Units"] == ""
    # a series: one data array per column, read back as (n_vertices, n)
    series = rng.normal(size=(50, 4)).astype(np.float32)
    q = io.write_surface_map(tmp_path / "series.func.gii", series, units="a.u.")
    assert len(nib.load(str(q)).darrays) == 4
    np.testing.assert_array_equal(io.read_surface_data(q), series)


def test_write_surface_maps_one_file_per_map(tmp_path):
    rng = np.random.default_rng(2)
    maps = {"f": rng.uniform(size=20), "rn": rng.uniform(size=20)}
    out = io.write_surface_maps(
        tmp_path, maps, prefix="lh.", units={"rn": "1/ms"}, model="NEXI", n_vertices=20
    )
    assert sorted(p.name for p in out.values()) == ["lh.f.func.gii", "lh.rn.func.gii"]
    for k, p in out.items():
        np.testing.assert_array_equal(io.read_surface_data(p), maps[k].astype(np.float32))
    assert dict(nib.load(str(out["rn"])).darrays[0].meta)["Units"] == "1/ms"


def test_surf_gii_and_freesurfer_geometry_round_trip(tmp_path):
    coords, faces = _mesh()
    s = io.read_surface(io.write_surface(tmp_path / "lh.mid.surf.gii", coords, faces))
    np.testing.assert_array_equal(s.coords, coords.astype(np.float64))
    np.testing.assert_array_equal(s.faces, faces)
    fs = tmp_path / "lh.white"
    nib.freesurfer.write_geometry(str(fs), coords, faces)
    g = io.read_surface(fs)
    np.testing.assert_array_equal(g.coords, coords.astype(np.float64))
    np.testing.assert_array_equal(g.faces, faces)
    assert g.n_vertices == 50 and g.n_faces == 80
    np.testing.assert_array_equal(g.edges(), io.mesh_edges(faces))


def test_mgh_and_morph_data(tmp_path):
    rng = np.random.default_rng(3)
    series = rng.normal(size=(30, 5)).astype(np.float32)
    p = tmp_path / "lh.dwi.mgz"
    nib.save(nib.MGHImage(series[:, None, None, :], np.eye(4)), str(p))
    np.testing.assert_array_equal(io.read_surface_data(p, n_vertices=30), series)
    one = tmp_path / "lh.thick.mgh"
    nib.save(nib.MGHImage(series[:, :1, None], np.eye(4)), str(one))
    np.testing.assert_array_equal(io.read_surface_data(one), series[:, 0])
    th = tmp_path / "lh.thickness"
    nib.freesurfer.write_morph_data(str(th), series[:, 0])
    np.testing.assert_array_equal(io.read_surface_data(th), series[:, 0])


def test_surface_validation(tmp_path):
    coords, faces = _mesh()
    bad = faces.copy()
    bad[0, 0] = 50
    with pytest.raises(ShapeError, match="refer to vertex 50 but the surface has 50 vertices"):
        io.write_surface(tmp_path / "x.surf.gii", coords, bad)
    fs = tmp_path / "lh.bad"
    nib.freesurfer.write_geometry(str(fs), coords[:40], faces)  # triangles reach vertex 49
    with pytest.raises(ShapeError, match="lh.bad: triangles refer to vertex 49 but the surface"):
        io.read_surface(fs)
    with pytest.raises(ShapeError, match=r"\(n_faces, 3\)"):
        io.mesh_edges(faces[:, :2])
    with pytest.raises(ShapeError, match="negative"):
        io.mesh_edges(-faces - 1)
    p = io.write_surface_map(tmp_path / "m.func.gii", np.zeros(49, np.float32))
    with pytest.raises(ShapeError, match="has shape \\(49,\\) but the surface has 50"):
        io.read_surface_data(p, n_vertices=50)
    with pytest.raises(DataFileError, match="POINTSET"):
        io.read_surface(p)
    with pytest.raises(DataFileError, match="not found"):
        io.read_surface(tmp_path / "missing.surf.gii")
    with pytest.raises(DataFileError, match="cannot read surface"):
        (tmp_path / "junk").write_bytes(b"not a surface")
        io.read_surface(tmp_path / "junk")
    with pytest.raises(ShapeError, match="vertices"):
        io.write_surface_map(tmp_path / "y.func.gii", np.zeros(10), n_vertices=12)
