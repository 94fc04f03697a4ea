"""NIfTI input and output (nibabel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataFileError, ShapeError


def load_nifti(path: str | Path, *, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file.

    Returns
    -------
    data : ndarray
        Scaled image data (``dtype``; complex files keep a complex type).
    affine : (4, 4) ndarray
        Voxel-to-world matrix.

    Raises
    ------
    DataFileError
        If the file is missing or not a readable NIfTI image; the message names the path.
    """
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise DataFileError(f"NIfTI file not found: {p}")
    try:
        img = nib.load(str(p))
        if np.issubdtype(img.get_data_dtype(), np.complexfloating):
            data = np.asarray(img.dataobj).astype(np.complex64)
        else:
            data = np.asarray(img.get_fdata(dtype=np.float64)).astype(dtype)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataFileError(f"cannot read NIfTI file {p}: {type(exc).__name__}: {exc}") from exc
    return data, np.asarray(img.affine, dtype=np.float64)


def save_nifti(path: str | Path, data: Any, *, affine: Any = None) -> Path:
    """Write ``data`` (tensor or array) as NIfTI; NaNs are kept, bool maps become uint8."""
    import nibabel as nib

    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ShapeError(f"affine must be a 4x4 matrix, got shape {aff.shape}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        nib.save(nib.Nifti1Image(arr, aff), str(p))
    except Exception as exc:
        raise DataFileError(f"cannot write NIfTI file {p}: {exc}") from exc
    return p
