"""Array order and scanner geometry: the one conversion between qmrkit's array order and NIfTI
order, and the NIfTI affine of an MRD raw scan.

Array order (domain functions, ``RawScan`` k-space, ``recon`` images, ``mrf.match``) is
``(..., z, y, x)`` with the readout last; NIfTI order (pipeline inputs and outputs, files, the
server's images) is ``(x, y, z)`` — exactly what :func:`qmrkit.io.load_nifti` returns.
:func:`to_nifti_order` and :func:`from_nifti_order` convert between the two.

Geometry: an MRD acquisition carries ``position`` (centre of the slice or slab, mm) and the unit
vectors ``read_dir``, ``phase_dir``, ``slice_dir`` in patient coordinates, which are LPS like
DICOM's (x towards the patient's left, y posterior, z head). NIfTI world space is RAS, so x and y
change sign. The image axes x, y, z of NIfTI order run along ``read_dir``, ``phase_dir`` and
``slice_dir``; voxel sizes are the reconstruction field of view divided by its matrix. The centre
of voxel ``i`` along an axis of ``n`` voxels lies ``(i − n // 2)·Δ`` from ``position`` — voxel
``n // 2`` is the origin of qmrkit's centred FFT (``fftshift`` convention), which is where the
scanner's gradient origin (the FOV centre) lands in a reconstructed image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ShapeError

#: LPS (MRD, DICOM) → RAS (NIfTI): x and y change sign
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def to_nifti_order(a: Any, n_spatial: int) -> Any:
    """Reverse the last ``n_spatial`` axes: ``(..., z, y, x)`` → ``(..., x, y, z)``.

    Parameters
    ----------
    a : ndarray or Tensor
        Array whose last ``n_spatial`` axes are spatial, in array order.
    n_spatial : int
        Number of spatial axes (2 or 3).

    Returns
    -------
    ndarray or Tensor
        A view (same type as ``a``) with the spatial axes in NIfTI order.
    """
    nd = a.ndim
    if not 1 <= n_spatial <= nd:
        raise ShapeError(f"need at least {n_spatial} axes to reorder, got shape {tuple(a.shape)}")
    order = list(range(nd - n_spatial)) + list(range(nd - 1, nd - n_spatial - 1, -1))
    if isinstance(a, torch.Tensor):
        return a.permute(*order)
    return np.transpose(np.asarray(a), order)


def from_nifti_order(a: Any, n_spatial: int) -> Any:
    """Reverse the last ``n_spatial`` axes: ``(..., x, y, z)`` → ``(..., z, y, x)`` (the inverse
    of :func:`to_nifti_order`, which is its own inverse)."""
    return to_nifti_order(a, n_spatial)


@dataclass(frozen=True)
class ScanGeometry:
    """Where a scan sits in the scanner, as MRD acquisitions state it (LPS patient coordinates).

    Attributes
    ----------
    position : tuple of 3 float
        Centre of the slice (2D) or slab (3D), mm.
    read_dir, phase_dir, slice_dir : tuple of 3 float
        Unit vectors of the readout (image x), phase-encoding (image y) and slice/partition
        (image z) directions.
    """

    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    read_dir: tuple[float, float, float] = (1.0, 0.0, 0.0)
    phase_dir: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_dir: tuple[float, float, float] = (0.0, 0.0, 1.0)

    @classmethod
    def from_acquisition(cls, acq: Any) -> ScanGeometry | None:
        """The geometry in an ``ismrmrd.Acquisition`` (or Image) header; None when its direction
        vectors are all zero (no geometry recorded)."""
        dirs = [tuple(float(v) for v in getattr(acq, n)[:3]) for n in _DIRS]
        if not any(any(d) for d in dirs):
            return None
        pos = tuple(float(v) for v in acq.position[:3])
        return cls(pos, *dirs)  # type: ignore[arg-type]

    def write_to(self, acq: Any) -> None:
        """Copy position and directions into an ``ismrmrd.Acquisition`` (or Image) header."""
        acq.position[:] = self.position
        for name in _DIRS:
            getattr(acq, name)[:] = getattr(self, name)

    def directions(self) -> np.ndarray:
        """``(3, 3)`` LPS matrix whose columns are read, phase and slice directions."""
        return np.stack([np.asarray(getattr(self, n), dtype=np.float64) for n in _DIRS], axis=1)


_DIRS = ("read_dir", "phase_dir", "slice_dir")


def nifti_affine(
    shape_xyz: Sequence[int], voxel_mm_xyz: Sequence[float], geometry: ScanGeometry | None = None
) -> np.ndarray:
    """4×4 RAS voxel-to-world affine of an image in NIfTI order.

    Parameters
    ----------
    shape_xyz : (3,) ints
        Image size in NIfTI order ``(nx, ny, nz)`` (nz = 1 for 2D).
    voxel_mm_xyz : (3,) floats
        Voxel size (mm) along x (read), y (phase), z (slice or partition).
    geometry : ScanGeometry, optional
        Position and directions; identity directions and the origin at the FOV centre if absent.
    """
    if len(shape_xyz) != 3 or len(voxel_mm_xyz) != 3:
        raise ShapeError(
            f"shape and voxel size need 3 entries (x, y, z), got {shape_xyz}, {voxel_mm_xyz}"
        )
    g = geometry or ScanGeometry()
    cols = g.directions() * np.asarray(voxel_mm_xyz, dtype=np.float64)[None, :]  # LPS, mm/voxel
    centre_index = np.array([n // 2 for n in shape_xyz], dtype=np.float64)
    origin = np.asarray(g.position, dtype=np.float64) - cols @ centre_index  # voxel (0,0,0)
    aff = np.eye(4)
    aff[:3, :3] = _LPS_TO_RAS @ cols
    aff[:3, 3] = _LPS_TO_RAS @ origin
    return aff


def affine_from_mrd(header: Any, acquisition: Any = None, *, encoding: int = 0) -> np.ndarray:
    """NIfTI (RAS) affine of the image reconstructed from an MRD scan, in NIfTI order.

    Parameters
    ----------
    header : str, bytes or ismrmrd.xsd.ismrmrdHeader
        The MRD XML header; voxel size = reconSpace field of view / matrix (x, y, z; for 2D the
        z field of view is the slice thickness).
    acquisition : ismrmrd.Acquisition, optional
        Source of ``position`` and ``read_dir``/``phase_dir``/``slice_dir``; identity directions
        and the origin at the FOV centre when absent or when its directions are zero.
    encoding : int
        Encoding space.
    """
    from .._optional import require

    if isinstance(header, str | bytes):
        xsd = require("ismrmrd").xsd
        header = xsd.CreateFromDocument(header.decode() if isinstance(header, bytes) else header)
    space = header.encoding[encoding].reconSpace
    m, f = space.matrixSize, space.fieldOfView_mm
    shape = (int(m.x), int(m.y), max(int(m.z), 1))
    voxel = (float(f.x) / shape[0], float(f.y) / shape[1], float(f.z) / shape[2])
    geometry = None if acquisition is None else ScanGeometry.from_acquisition(acquisition)
    return nifti_affine(shape, voxel, geometry)


def affines_match(a: Any, b: Any, *, voxel_fraction: float = 0.5, rtol: float = 1e-3) -> bool:
    """Whether two affines describe the same voxel grid: equal orientation and voxel size
    (relative ``rtol``) and origins within ``voxel_fraction`` of a voxel."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.linalg.norm(a[:3, :3], axis=0)
    if not np.allclose(a[:3, :3], b[:3, :3], rtol=0, atol=rtol * scale.max()):
        return False
    return bool(np.linalg.norm(a[:3, 3] - b[:3, 3]) <= voxel_fraction * scale.min())


def map_from_nifti(a: Any, image_size: Sequence[int], name: str = "map") -> np.ndarray:
    """Check a map given in NIfTI order against an image of ``image_size`` (array order
    ``(ny, nx)`` / ``(nz, ny, nx)``) and return it in array order (a float64 ndarray).

    Raises
    ------
    ShapeError
        The map has the image's array-order shape (non-square: it looks like ``(y, x)`` order;
        pipelines take NIfTI order ``(x, y[, z])``), or any other shape than the NIfTI-order
        image shape; the message names both shapes.
    """
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    size = tuple(int(n) for n in image_size)
    expected = size[::-1]
    if arr.shape == expected:
        return np.asarray(from_nifti_order(arr, len(size)), dtype=np.float64)
    if arr.shape == size:
        raise ShapeError(
            f"{name} has shape {arr.shape}, which looks like array (y, x[, z]) order; pipelines "
            f"take NIfTI order (x, y[, z]), i.e. shape {expected} (as io.load_nifti returns)"
        )
    raise ShapeError(
        f"{name} has shape {arr.shape} but the image is {expected} in NIfTI order (x, y[, z])"
    )


__all__ = [
    "to_nifti_order",
    "from_nifti_order",
    "ScanGeometry",
    "nifti_affine",
    "affine_from_mrd",
    "affines_match",
    "map_from_nifti",
]
