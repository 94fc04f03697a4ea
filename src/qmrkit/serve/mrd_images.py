"""Conversions between qmrkit arrays and MRD images, and the geometry every returned image carries.

MRD images hold ``data[channels, z, y, x]`` (x, the readout direction, fastest in memory). qmrkit
maps crossing the service are in NIfTI order ``(x, y[, z])`` (:func:`array_to_image`,
:func:`image_to_array`: the axes reversed, nothing flipped); reconstructed images are in array
order ``(z, y, x)`` like ``recon`` returns them (:func:`volume_to_image`: put in unchanged).

:func:`image_geometry` is the one place that turns an acquisition (or an input image) and the MRD
XML header into image header fields: field of view (mm, reconSpace of the header), position,
read/phase/slice directions, table position, measurement uid and loop counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ShapeError

Vec3 = tuple[float, float, float]

# loop counters copied from the source acquisition/image (its idx for acquisitions)
_COUNTERS = ("average", "slice", "contrast", "phase", "repetition", "set")


@dataclass(frozen=True)
class ImageGeometry:
    """Where an MRD image lies, as its header says it.

    Attributes
    ----------
    field_of_view : (x, y, z) mm
        In-plane FOV and, for a 2D slice, the slice thickness; for a 3D image the slab extent.
    position : (x, y, z) mm
        Centre of the slice (2D) or of the volume (3D), patient coordinates.
    read_dir, phase_dir, slice_dir : unit vectors
        Directions of the image x, y and z axes.
    patient_table_position : (x, y, z) mm
    measurement_uid : int
    counters : dict
        ``slice``, ``contrast``, ``repetition``, ... of the source.
    """

    field_of_view: Vec3 = (0.0, 0.0, 0.0)
    position: Vec3 = (0.0, 0.0, 0.0)
    read_dir: Vec3 = (1.0, 0.0, 0.0)
    phase_dir: Vec3 = (0.0, 1.0, 0.0)
    slice_dir: Vec3 = (0.0, 0.0, 1.0)
    patient_table_position: Vec3 = (0.0, 0.0, 0.0)
    measurement_uid: int = 0
    counters: tuple[tuple[str, int], ...] = ()

    def apply(self, img: Any) -> None:
        """Write these fields into an ``ismrmrd.Image`` header."""
        for name in (
            "field_of_view",
            "position",
            "read_dir",
            "phase_dir",
            "slice_dir",
            "patient_table_position",
        ):
            getattr(img, name)[:] = [float(v) for v in getattr(self, name)]
        img.measurement_uid = int(self.measurement_uid)
        for name, value in self.counters:
            setattr(img, name, int(value))


def _vec(obj: Any, name: str, default: Vec3) -> Vec3:
    try:
        v = [float(x) for x in getattr(obj, name)[:3]]
    except (AttributeError, TypeError):
        return default
    return (v[0], v[1], v[2])


def recon_fov_mm(header: Any, encoding: int = 0) -> Vec3 | None:
    """The reconSpace field of view ``(x, y, z)`` in mm of an ismrmrd header (None without one)."""
    try:
        f = header.encoding[encoding].reconSpace.fieldOfView_mm
        return (float(f.x), float(f.y), float(f.z))
    except (AttributeError, IndexError, TypeError):
        return None


def image_geometry(header: Any = None, source: Any = None, *, encoding: int = 0) -> ImageGeometry:
    """Image header fields from the MRD XML header and a source acquisition or image.

    Parameters
    ----------
    header : ismrmrdHeader, optional
        Gives the field of view (reconSpace ``fieldOfView_mm``, mm).
    source : ismrmrd.Acquisition or ismrmrd.Image, optional
        Gives position, directions, table position, measurement uid and loop counters (for an
        acquisition: the readout nearest the k-space centre of the slice is the usual choice).
        An input image's own non-zero field of view is kept (maps computed from images lie where
        those images lie); otherwise the header's is used.
    """
    kw: dict[str, Any] = {}
    fov = recon_fov_mm(header, encoding) if header is not None else None
    if source is not None:
        for name, default in (
            ("position", (0.0, 0.0, 0.0)),
            ("read_dir", (1.0, 0.0, 0.0)),
            ("phase_dir", (0.0, 1.0, 0.0)),
            ("slice_dir", (0.0, 0.0, 1.0)),
            ("patient_table_position", (0.0, 0.0, 0.0)),
        ):
            kw[name] = _vec(source, name, default)
        kw["measurement_uid"] = int(getattr(source, "measurement_uid", 0))
        idx = getattr(source, "idx", source)  # acquisitions keep counters in idx, images in head
        kw["counters"] = tuple((c, int(getattr(idx, c, 0))) for c in _COUNTERS)
        own = _vec(source, "field_of_view", (0.0, 0.0, 0.0))
        if not hasattr(source, "idx") and any(own):
            fov = own
    if fov is not None:
        kw["field_of_view"] = fov
    return ImageGeometry(**kw)


def image_to_array(img: Any) -> np.ndarray:
    """One MRD image → array (x, y[, z]) (channel 0; complex kept)."""
    a = np.asarray(img.data)[0]  # (z, y, x)
    a = a.transpose(2, 1, 0)
    return a[..., 0] if a.shape[2] == 1 else a


def volume_to_image(
    a: np.ndarray,
    *,
    series_index: int,
    image_index: int = 0,
    meta: dict[str, str] | None = None,
    geometry: ImageGeometry | None = None,
    image_type: int | None = None,
) -> Any:
    """A real array in MRD/recon order ``(y, x)`` or ``(z, y, x)`` → one float32 MRD image.

    The array goes into ``data[0]`` unchanged (x fastest), NaN/inf become 0. ``image_type``:
    an ``ismrmrd.IMTYPE_*`` (default magnitude); ``meta``: MRD meta attributes (``DataRole``,
    ``SeriesDescription``, ...).
    """
    import ismrmrd

    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ShapeError(f"an MRD image takes a (y, x) or (z, y, x) array, got shape {arr.shape}")
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    img = ismrmrd.Image.from_array(np.ascontiguousarray(arr[None]), transpose=False)
    if geometry is not None:
        geometry.apply(img)
    img.image_series_index = series_index
    img.image_index = image_index
    img.image_type = ismrmrd.IMTYPE_MAGNITUDE if image_type is None else image_type
    m = ismrmrd.Meta()
    for k, v in (meta or {}).items():
        m[k] = v
    img.attribute_string = m.serialize()
    return img


def array_to_image(
    a: np.ndarray,
    *,
    series_index: int,
    image_index: int = 0,
    meta: dict[str, str] | None = None,
    like: Any = None,
    geometry: ImageGeometry | None = None,
    image_type: int | None = None,
) -> Any:
    """Array in NIfTI order (x, y[, z]) → float32 MRD image with meta (e.g.
    ``DataRole=Quantitative``); geometry from ``geometry``, else copied from the image ``like``
    (through :func:`image_geometry`)."""
    if geometry is None and like is not None:
        geometry = image_geometry(None, like)
    arr = np.asarray(a)
    if arr.ndim not in (2, 3):
        raise ShapeError(f"a map must be (x, y) or (x, y, z), got shape {arr.shape}")
    return volume_to_image(
        arr.T,
        series_index=series_index,
        image_index=image_index,
        meta=meta,
        geometry=geometry,
        image_type=image_type,
    )
