"""NIfTI input and output (nibabel), and the JSON sidecar that goes with every written map.

Arrays are in NIfTI order ``(x, y[, z][, t])``: what :func:`load_nifti` returns is what every
qmrkit pipeline takes, and what :func:`save_nifti` writes back. Every file written carries its
affine in both the qform and the sform (with their codes), millimetre units and a description; a
map written by :func:`save_map` also gets a BIDS-style JSON sidecar with units and provenance.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataFileError, ShapeError

#: NIfTI xform codes (nibabel names): 1 = scanner-based anatomical coordinates, the meaning of an
#: affine that comes from the scanner (an MRD header); 0 = unknown (no affine was given).
SCANNER, UNKNOWN = 1, 0


def load_nifti(
    path: str | Path, *, dtype: Any = np.float32, with_header: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, Any]:
    """Read a NIfTI file.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.
    dtype : numpy dtype
        Type of real data (complex files keep a complex type).
    with_header : bool
        Also return the nibabel header, so that maps written from this data keep its qform/sform
        codes and units (pass it to :func:`save_nifti` / ``FitResult.save`` as ``like=``).

    Returns
    -------
    data : ndarray
        Scaled image data in NIfTI order ``(x, y[, z][, t])``.
    affine : (4, 4) ndarray
        Voxel-to-world matrix (mm).
    header : nibabel.Nifti1Header
        Only with ``with_header=True``.

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
    affine = np.asarray(img.affine, dtype=np.float64)
    if with_header:
        return data, affine, img.header.copy()
    return data, affine


def save_nifti(
    path: str | Path,
    data: Any,
    *,
    affine: Any = None,
    like: Any = None,
    description: str | None = None,
) -> Path:
    """Write ``data`` (tensor or array, NIfTI order) as NIfTI; NaNs are kept, bool maps become uint8.

    Parameters
    ----------
    path : str or Path
        Output file; parent folders are created.
    data : array or Tensor
        ``(x, y[, z][, ...])``; float64 is stored as float32.
    affine : (4, 4) array, optional
        Voxel-to-world matrix (mm). Default: the affine of ``like``, else identity.
    like : nibabel header, optional
        Header of the input the data came from (``load_nifti(..., with_header=True)``): its qform
        and sform codes are kept. Without it the codes are 1 (scanner) when an affine is given and
        0 (unknown) when not.
    description : str, optional
        Stored in the header's ``descrip`` field (at most 80 characters).

    Returns
    -------
    Path
        The file written.
    """
    import nibabel as nib

    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if affine is None and like is not None:
        affine = like.get_best_affine()
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ShapeError(f"affine must be a 4x4 matrix, got shape {aff.shape}")
    if like is not None:
        qcode, scode = int(like["qform_code"]), int(like["sform_code"])
        # an input with neither code still had a meaningful affine if it was not the identity
        if qcode == scode == UNKNOWN and not np.allclose(aff, np.eye(4)):
            qcode = scode = SCANNER
    else:
        qcode = scode = SCANNER if affine is not None else UNKNOWN
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=qcode)
    img.set_sform(aff, code=scode)
    img.header.set_xyzt_units(xyz="mm")  # qmrkit's affines are in millimetres
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:80]
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(p))
    except Exception as exc:
        raise DataFileError(f"cannot write NIfTI file {p}: {exc}") from exc
    return p


def sidecar_path(nifti_path: str | Path) -> Path:
    """``dir/T1map.nii.gz`` → ``dir/T1map.json`` (the BIDS sidecar next to an image)."""
    p = Path(nifti_path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


def software_versions() -> dict[str, str]:
    """Versions recorded in every sidecar (qmrkit, torch, python)."""
    from .. import __version__

    return {"qmrkit": __version__, "torch": torch.__version__, "python": platform.python_version()}


def save_map(
    directory: str | Path,
    stem: str,
    data: Any,
    *,
    unit: str = "",
    description: str = "",
    affine: Any = None,
    like: Any = None,
    provenance: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write one parameter map as ``<stem>.nii.gz`` plus its BIDS-style ``<stem>.json`` sidecar.

    The sidecar holds ``Units``, ``Description``, ``Sources`` / provenance (input files, model,
    solver, settings: whatever ``provenance`` gives) and ``GeneratedBy`` (software versions), the
    fields BIDS derivatives use for parametric maps. Units are qmrkit's (times in ms), stated in
    ``Units``; BIDS defines ``T1map``/``T2map``/``T2starmap`` in seconds, so a BIDS-derivatives
    writer converts them (:func:`qmrkit.io.bids.to_bids_units`, as ``qmrkit batch`` does).

    Parameters
    ----------
    directory : str or Path
        Output folder.
    stem : str
        File name without extension, BIDS-style where BIDS has a name (``T1map``, ``T2map``,
        ``T2starmap``, ``R2starmap``, ``M0map``, ``TB1map``, ...), possibly with a prefix.
    data : array or Tensor
        The map in NIfTI order.
    unit, description : str
        Physical unit (``"ms"``, ``"1/s"``, ``"fraction"``, ``""``) and a one-line description.
    affine, like :
        As in :func:`save_nifti`.
    provenance : mapping, optional
        Extra sidecar fields (JSON-serialisable after conversion of arrays and tensors).

    Returns
    -------
    list of Path
        The NIfTI file and its sidecar.
    """
    d = Path(directory)
    text = f"qmrkit {stem}" + (f" [{unit}]" if unit else "")
    nii = save_nifti(d / f"{stem}.nii.gz", data, affine=affine, like=like, description=text)
    side = {"Units": unit, "Description": description or stem}
    side.update(jsonable(dict(provenance or {})))
    side["GeneratedBy"] = [{"Name": "qmrkit", "Version": software_versions()["qmrkit"]}]
    side["Software"] = software_versions()
    js = sidecar_path(nii)
    try:
        js.write_text(json.dumps(side, indent=2))
    except OSError as exc:
        raise DataFileError(f"cannot write sidecar {js}: {exc}") from exc
    return [nii, js]


def jsonable(obj: Any) -> Any:
    """Arrays, tensors, paths and numpy scalars → plain JSON types (recursively)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if obj.size > 256:  # maps and series are files, not sidecar fields
            return f"array{tuple(obj.shape)}"
        obj = obj.tolist() if not np.iscomplexobj(obj) else obj.astype(str).tolist()
        return obj if obj.__class__ is list else jsonable(obj)
    if isinstance(obj, np.generic | complex):
        return str(obj) if np.iscomplexobj(obj) else obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)
