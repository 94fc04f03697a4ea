"""Conversions between qmrkit maps (NIfTI order x, y[, z]) and MRD images (channels, z, y, x)."""

from __future__ import annotations

from typing import Any

import numpy as np


def image_to_array(img: Any) -> np.ndarray:
    """One MRD image → array (x, y[, z]) (channel 0; complex kept)."""
    a = np.asarray(img.data)[0]  # (z, y, x)
    a = a.transpose(2, 1, 0)
    return a[..., 0] if a.shape[2] == 1 else a


def array_to_image(
    a: np.ndarray,
    *,
    series_index: int,
    image_index: int = 0,
    meta: dict[str, str] | None = None,
    like: Any = None,
) -> Any:
    """Array (x, y[, z]) → float32 MRD image with meta (e.g. ``DataRole=Quantitative``)."""
    import ismrmrd

    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    img = ismrmrd.Image.from_array(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    if like is not None:
        for field in (
            "field_of_view",
            "position",
            "read_dir",
            "phase_dir",
            "slice_dir",
            "patient_table_position",
        ):
            try:
                getattr(img, field)[:] = getattr(like, field)[:]
            except (AttributeError, TypeError):
                pass
        img.measurement_uid = like.measurement_uid
    img.image_series_index = series_index
    img.image_index = image_index
    img.image_type = ismrmrd.IMTYPE_MAGNITUDE
    m = ismrmrd.Meta()
    for k, v in (meta or {}).items():
        m[k] = v
    img.attribute_string = m.serialize()
    return img
