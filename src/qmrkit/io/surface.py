"""Surface meshes and per-vertex data (nibabel): GIfTI, FreeSurfer geometry, MGH/MGZ.

Surface-based fitting (GACELLE demo 1, paper 004 §2.6.1) fits a model at every vertex of a cortical
mesh and regularises along the mesh's edges (:class:`qmrkit.fit.GraphTV`). This module reads the
mesh (vertex coordinates and triangles) and the per-vertex series that go into such a fit, and
writes the fitted maps back as one ``.func.gii`` file per map.

Layout: per-vertex data are ``(n_vertices,)`` or ``(n_vertices, n)`` — vertices first, as the
fitting functions take ``(*spatial, n_meas)`` with the spatial "shape" ``(n_vertices,)``. Vertex
coordinates are in mm (the surface's own space, e.g. FreeSurfer's tkr-RAS).

Readers:

* :func:`read_surface` — ``.surf.gii`` (POINTSET + TRIANGLE data arrays) or a FreeSurfer geometry
  file (``lh.white``, ``rh.pial``, ``lh.midthickness`` …) → :class:`Surface`;
* :func:`read_surface_data` — ``.func.gii`` / ``.shape.gii`` (one data array per column, e.g. a
  series), ``.mgh`` / ``.mgz`` (vertex data stored as an ``(n_vertices, 1, 1[, n])`` volume) or a
  FreeSurfer morphometry file (``lh.thickness``, ``lh.curv``) → ``(n_vertices[, n])``.

Writers: :func:`write_surface` (``.surf.gii``), :func:`write_surface_map` (one ``.func.gii`` with
the map's name, units and model in the GIfTI metadata) and :func:`write_surface_maps` (one file per
map of a dict or fit result).

Every reader checks that the mesh is well formed (coordinates ``(N, 3)``, triangles ``(F, 3)``
with indices in ``[0, N)``) and, given ``n_vertices``, that the data have one row per vertex;
problems raise :class:`~qmrkit.errors.ShapeError` or :class:`~qmrkit.errors.DataFileError` naming
the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataFileError, ShapeError

GIFTI_SUFFIXES = (".gii",)
MGH_SUFFIXES = (".mgh", ".mgz")


@dataclass
class Surface:
    """A triangle mesh.

    Attributes
    ----------
    coords : ndarray (n_vertices, 3), float64
        Vertex coordinates (mm).
    faces : ndarray (n_faces, 3), int64
        Vertex indices of each triangle.
    """

    coords: np.ndarray
    faces: np.ndarray

    @property
    def n_vertices(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    def edges(self) -> np.ndarray:
        """Unique undirected edges ``(E, 2)`` of the mesh (see :func:`mesh_edges`)."""
        return mesh_edges(self.faces, n_vertices=self.n_vertices)


# ------------------------------------------------------------------------------------------------
# topology
# ------------------------------------------------------------------------------------------------
def check_faces(faces: Any, n_vertices: int | None = None, *, what: str = "faces") -> np.ndarray:
    """Validate triangles: an integer ``(F, 3)`` array with indices in ``[0, n_vertices)``.

    Returns the faces as int64. Raises :class:`ShapeError` naming what is wrong.
    """
    f = _as_index_array(faces, what)
    if f.ndim != 2 or f.shape[1] != 3:
        raise ShapeError(f"{what} must be an (n_faces, 3) array of vertex indices, got {f.shape}")
    _check_range(f, n_vertices, what)
    return f


def check_edges(edges: Any, n_vertices: int | None = None, *, what: str = "edges") -> np.ndarray:
    """Validate an edge list: an integer ``(E, 2)`` array with indices in ``[0, n_vertices)`` and
    no self-loops. Returns it as int64."""
    e = _as_index_array(edges, what)
    if e.ndim != 2 or e.shape[1] != 2:
        raise ShapeError(f"{what} must be an (n_edges, 2) array of vertex indices, got {e.shape}")
    _check_range(e, n_vertices, what)
    loops = e[:, 0] == e[:, 1]
    if loops.any():
        k = int(np.flatnonzero(loops)[0])
        raise ShapeError(
            f"{what} contain {int(loops.sum())} self-loop(s) (e.g. row {k}: {e[k].tolist()}); an edge "
            "must join two different vertices"
        )
    return e


def mesh_edges(faces: Any, n_vertices: int | None = None) -> np.ndarray:
    """Unique undirected edges of a triangle mesh.

    Parameters
    ----------
    faces : array (n_faces, 3) of int
        Vertex indices of each triangle.
    n_vertices : int, optional
        Number of vertices; when given, indices are checked to lie in ``[0, n_vertices)``.

    Returns
    -------
    ndarray (n_edges, 2), int64
        Each edge once, as ``(i, j)`` with ``i < j``, sorted lexicographically. Two triangles that
        share a side contribute that edge once; vertices that are close in space but belong to no
        common triangle share no edge.
    """
    f = check_faces(faces, n_vertices)
    if f.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], axis=0)
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]  # degenerate triangles repeat a vertex
    return np.unique(pairs, axis=0)


def _as_index_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        elif a.size == 0:
            a = a.astype(np.int64)
        else:
            raise ShapeError(f"{what} must hold integer vertex indices, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_range(a: np.ndarray, n_vertices: int | None, what: str) -> None:
    if a.size == 0:
        return
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        raise ShapeError(f"{what} contain a negative vertex index ({lo}); indices start at 0")
    if n_vertices is not None and hi >= n_vertices:
        raise ShapeError(
            f"{what} refer to vertex {hi} but the surface has {n_vertices} vertices "
            f"(valid indices 0..{n_vertices - 1})"
        )


def check_vertex_data(data: Any, n_vertices: int, *, what: str = "vertex data") -> np.ndarray:
    """Check that per-vertex data have one row per vertex: ``(n_vertices[, ...])``."""
    a = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if a.ndim == 0 or a.shape[0] != n_vertices:
        raise ShapeError(
            f"{what} has shape {a.shape} but the surface has {n_vertices} vertices; per-vertex "
            "data must have the vertices along the first axis"
        )
    return a


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _is_gifti(p: Path) -> bool:
    return p.name.lower().endswith(GIFTI_SUFFIXES)


def _is_mgh(p: Path) -> bool:
    return p.name.lower().endswith(MGH_SUFFIXES)


def _exists(p: Path, kind: str) -> None:
    if not p.exists():
        raise DataFileError(f"{kind} file not found: {p}")


def read_surface(path: str | Path) -> Surface:
    """Read a triangle mesh: GIfTI ``.surf.gii`` or a FreeSurfer geometry file.

    Parameters
    ----------
    path : str or Path
        ``*.surf.gii`` (needs one ``NIFTI_INTENT_POINTSET`` and one ``NIFTI_INTENT_TRIANGLE`` data
        array) or a FreeSurfer surface (``lh.white``, ``rh.pial``, …; read with
        ``nibabel.freesurfer.read_geometry``).

    Returns
    -------
    Surface
        ``coords (N, 3)`` float64 in mm and ``faces (F, 3)`` int64.

    Raises
    ------
    DataFileError
        Missing or unreadable file, or a GIfTI without a point set / triangle array.
    ShapeError
        Coordinates not ``(N, 3)`` or triangles referring to vertices that do not exist.
    """
    import nibabel as nib

    p = Path(path)
    _exists(p, "surface")
    try:
        if _is_gifti(p):
            img = nib.load(str(p))
            pts = img.get_arrays_from_intent("NIFTI_INTENT_POINTSET")
            tri = img.get_arrays_from_intent("NIFTI_INTENT_TRIANGLE")
            if len(pts) != 1 or len(tri) != 1:
                raise DataFileError(
                    f"{p}: a surface GIfTI needs exactly one POINTSET and one TRIANGLE data array, "
                    f"found {len(pts)} and {len(tri)} (is this a .func.gii? read it with "
                    "read_surface_data)"
                )
            coords, faces = np.asarray(pts[0].data), np.asarray(tri[0].data)
        else:
            coords, faces = nib.freesurfer.read_geometry(str(p))
    except DataFileError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt or foreign files
        raise DataFileError(f"cannot read surface {p}: {type(exc).__name__}: {exc}") from exc
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ShapeError(f"{p}: vertex coordinates must be (n_vertices, 3), got {coords.shape}")
    faces = check_faces(faces, coords.shape[0], what=f"{p.name}: triangles")
    return Surface(coords=coords, faces=faces)


def read_surface_data(
    path: str | Path, *, n_vertices: int | None = None, dtype: Any = None
) -> np.ndarray:
    """Read per-vertex data: GIfTI ``.func.gii`` / ``.shape.gii``, ``.mgh`` / ``.mgz``, or a
    FreeSurfer morphometry file (``lh.thickness``, ``lh.curv``).

    Parameters
    ----------
    path : str or Path
        The file. A GIfTI with several data arrays is a series: the arrays become columns.
    n_vertices : int, optional
        Expected vertex count (e.g. ``surface.n_vertices``); a mismatch raises :class:`ShapeError`.
    dtype : numpy dtype, optional
        Convert to this type (default: as stored).

    Returns
    -------
    ndarray
        ``(n_vertices,)`` for one value per vertex, ``(n_vertices, n)`` for a series.
    """
    import nibabel as nib

    p = Path(path)
    _exists(p, "surface data")
    try:
        if _is_gifti(p):
            img = nib.load(str(p))
            arrays = [np.asarray(d.data) for d in img.darrays]
            if not arrays:
                raise DataFileError(f"{p}: the GIfTI file holds no data array")
            if len(arrays) == 1:
                out = arrays[0]
            else:
                shapes = {a.shape for a in arrays}
                if len(shapes) != 1 or arrays[0].ndim != 1:
                    raise DataFileError(
                        f"{p}: a series GIfTI needs one (n_vertices,) array per column, got "
                        f"shapes {[a.shape for a in arrays]}"
                    )
                out = np.stack(arrays, axis=1)
        elif _is_mgh(p):
            img = nib.load(str(p))
            raw = np.asarray(img.dataobj)
            # vertex data in MGH are a (N, 1, 1[, T]) volume; drop the singleton "slice" axes only
            if raw.ndim >= 3 and raw.shape[1] == 1 and raw.shape[2] == 1:
                out = raw.reshape(raw.shape[0], *raw.shape[3:])
            else:
                raise DataFileError(
                    f"{p}: expected per-vertex MGH data of shape (n_vertices, 1, 1[, n]), got "
                    f"{raw.shape}"
                )
            if out.ndim == 2 and out.shape[1] == 1:
                out = out[:, 0]
        else:
            out = np.asarray(nib.freesurfer.read_morph_data(str(p)))
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(f"cannot read surface data {p}: {type(exc).__name__}: {exc}") from exc
    if out.ndim == 2 and out.shape[1] == 1 and _is_gifti(p):
        out = out[:, 0]
    if out.ndim not in (1, 2):
        raise ShapeError(f"{p}: per-vertex data must be (n_vertices[, n]), got {out.shape}")
    if n_vertices is not None:
        check_vertex_data(out, n_vertices, what=f"{p.name}")
    return out if dtype is None else out.astype(dtype)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def write_surface(path: str | Path, coords: Any, faces: Any) -> Path:
    """Write a triangle mesh as GIfTI ``.surf.gii`` (float32 coordinates, int32 triangles)."""
    import nibabel as nib

    c = np.asarray(coords.detach().cpu() if isinstance(coords, torch.Tensor) else coords)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ShapeError(f"vertex coordinates must be (n_vertices, 3), got {c.shape}")
    f = check_faces(faces, c.shape[0])
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    img = nib.gifti.GiftiImage(
        darrays=[
            nib.gifti.GiftiDataArray(
                c.astype(np.float32), intent="NIFTI_INTENT_POINTSET", datatype="NIFTI_TYPE_FLOAT32"
            ),
            nib.gifti.GiftiDataArray(
                f.astype(np.int32), intent="NIFTI_INTENT_TRIANGLE", datatype="NIFTI_TYPE_INT32"
            ),
        ]
    )
    _save_gifti(img, p)
    return p


def write_surface_map(
    path: str | Path,
    values: Any,
    *,
    name: str | None = None,
    units: str | None = None,
    model: str | None = None,
    n_vertices: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write one per-vertex map as GIfTI ``.func.gii``.

    Parameters
    ----------
    path : str or Path
        Output file (``*.func.gii`` by convention); parent folders are created.
    values : array or Tensor (n_vertices,) or (n_vertices, n)
        The map; a second axis is written as a series (one data array per column). Stored as
        float32 (GIfTI stores no float64), integers as int32; NaN (unfitted vertices) is kept.
    name, units, model : str, optional
        Stored in the data array's metadata as ``Name``, ``Units`` and ``Model``.
    n_vertices : int, optional
        Expected vertex count; a mismatch raises :class:`ShapeError`.
    meta : mapping, optional
        Further metadata (values stored as strings).

    Returns
    -------
    Path
        The file written.
    """
    import nibabel as nib

    a = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if a.ndim not in (1, 2):
        raise ShapeError(f"a surface map must be (n_vertices,) or (n_vertices, n), got {a.shape}")
    if n_vertices is not None:
        check_vertex_data(a, n_vertices, what=f"map {name or Path(path).name!r}")
    if a.dtype == np.bool_ or a.dtype.kind in "iu":
        a, dt = a.astype(np.int32), "NIFTI_TYPE_INT32"
    elif a.dtype.kind == "f":
        a, dt = a.astype(np.float32), "NIFTI_TYPE_FLOAT32"
    else:
        raise ShapeError(f"a surface map must be real (float, int or bool), got dtype {a.dtype}")
    md: dict[str, str] = {}
    for key, val in (("Name", name), ("Units", units), ("Model", model)):
        if val is not None:
            md[key] = str(val)
    for key, val in (meta or {}).items():
        md[str(key)] = str(val)
    cols = [a] if a.ndim == 1 else [np.ascontiguousarray(a[:, k]) for k in range(a.shape[1])]
    darrays = [
        nib.gifti.GiftiDataArray(
            c,
            intent="NIFTI_INTENT_ESTIMATE",
            datatype=dt,
            meta=nib.gifti.GiftiMetaData(md),
        )
        for c in cols
    ]
    img = nib.gifti.GiftiImage(darrays=darrays, meta=nib.gifti.GiftiMetaData(md))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _save_gifti(img, p)
    return p


def write_surface_maps(
    out_dir: str | Path,
    maps: Any,
    *,
    prefix: str = "",
    units: Mapping[str, str] | None = None,
    model: str | None = None,
    n_vertices: int | None = None,
) -> dict[str, Path]:
    """Write several per-vertex maps, one ``{prefix}{name}.func.gii`` file per map.

    Parameters
    ----------
    out_dir : str or Path
        Folder (created).
    maps : mapping of str -> array (n_vertices,), or a fit result
        A dict of maps, or anything with a ``maps`` dict (``FitResult``: its ``units`` and
        ``model_name`` are used where ``units`` / ``model`` do not say).
    prefix : str
        File-name prefix, e.g. ``"lh."`` or ``"sub-01_hemi-L_"``.
    units : mapping of str -> str, optional
        Units per map name (stored as ``Units``).
    model : str, optional
        Model name stored as ``Model``.
    n_vertices : int, optional
        Expected vertex count of every map.

    Returns
    -------
    dict of str -> Path
        The file written for each map.
    """
    d = getattr(maps, "maps", maps)
    if not isinstance(d, Mapping):
        raise ShapeError(f"maps must be a dict of name -> array or a fit result, got {type(maps)}")
    u = dict(units or {})
    # a FitResult / McmcResult carries units per map and the model's name
    for k, v in (getattr(maps, "units", None) or {}).items():
        if v:
            u.setdefault(k, v)
    if model is None:
        model = getattr(maps, "model_name", None)
    out = {}
    for key, val in d.items():
        out[key] = write_surface_map(
            Path(out_dir) / f"{prefix}{key}.func.gii",
            val,
            name=key,
            units=u.get(key),
            model=model,
            n_vertices=n_vertices,
        )
    return out


def _save_gifti(img: Any, p: Path) -> None:
    import nibabel as nib

    try:
        nib.save(img, str(p))
    except Exception as exc:
        raise DataFileError(f"cannot write GIfTI file {p}: {type(exc).__name__}: {exc}") from exc
