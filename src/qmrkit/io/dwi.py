"""Diffusion-weighted images as users have them: 4D NIfTI + FSL ``bval``/``bvec`` (+ sidecars).

Units and frames (what :func:`load_dwi` returns)
------------------------------------------------
* **b-values in ms/µm²** (= 10⁹ s/m²). FSL ``.bval`` files hold s/mm²; qmrkit divides by 1000, so
  ``b = 1000 s/mm²`` becomes ``1.0``. Diffusivities are then in µm²/ms (free water at 37 °C ≈ 3).
* **b-vectors exactly as FSL defines them**, as unit rows ``(n, 3)``: the components along the
  image's voxel axes (i, j, k), *except* that the first component is negated when the determinant
  of the NIfTI affine is positive. FSL stores every image internally in "radiological" voxel order;
  an image whose affine has det > 0 (neurological storage, e.g. LAS→RAS) gets its i axis flipped
  for that, and the b-vectors refer to the flipped axis. This is what ``dtifit`` consumes and what
  ``dcm2niix`` writes; DIPY's ``gradient_table`` takes the same numbers unchanged.
  :meth:`DWI.bvecs_voxel` undoes the flip (components along +i, +j, +k of the data array) and
  :meth:`DWI.bvecs_world` rotates those into the scanner/world frame of the affine (RAS+, mm),
  which is how MRtrix imports FSL gradients. A DTI fit gives the same FA/MD in every frame; only
  the eigenvector maps depend on the frame of the b-vectors they were fitted with.
* **b = 0 volumes** are those with ``b <= b0_threshold`` (default 0.05 ms/µm² = 50 s/mm², DIPY's
  default). Their b-vector may be zero (or NaN, read as zero); every other b-vector must have unit length within 1e-2 and
  is then normalised exactly.
* **δ and Δ in ms**, per volume (``small_delta``, ``big_delta``), from a protocol file or a JSON
  sidecar; ``None`` where neither gives them.

Protocol files (multi-diffusion-time data)
------------------------------------------
YAML with per-volume lists (or one scalar for all volumes)::

    b: [0, 1.0, 1.0, 2.5]        # ms/µm² (optional when a .bval file is given; must agree with it)
    small_delta: 7.0             # δ, gradient duration, ms
    big_delta: [13, 13, 30, 30]  # Δ, gradient separation, ms

or TSV with a header row naming the same columns and one row per volume (``#`` starts a comment).

JSON sidecars
-------------
The BIDS specification (1.9) defines no field for δ or Δ of a diffusion scan. qmrkit reads the
names used in practice: ``SmallDelta``/``BigDelta``, ``DiffusionGradientDuration``/
``DiffusionGradientSeparation`` and ``GradientDuration``/``GradientSeparation``, each a scalar or
a per-volume list **in seconds** (BIDS' unit for every time); a value ≥ 1 s is rejected as probably
in ms, with a pointer to the protocol file (whose unit is ms).
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFileError, ParameterError, ShapeError
from .nifti import load_nifti

#: default b = 0 threshold in ms/µm² (50 s/mm², as DIPY's gradient_table)
B0_THRESHOLD = 0.05
#: tolerance on |bvec| − 1 for diffusion-weighted volumes (DIPY's gradient_table uses the same)
UNIT_TOL = 1e-2
#: bval files are in s/mm²; qmrkit works in ms/µm²
S_PER_MM2_TO_MS_PER_UM2 = 1e-3

PROTOCOL_COLUMNS = ("b", "small_delta", "big_delta")
#: JSON sidecar key pairs (δ, Δ), all in seconds
SIDECAR_KEYS = (
    ("SmallDelta", "BigDelta"),
    ("DiffusionGradientDuration", "DiffusionGradientSeparation"),
    ("GradientDuration", "GradientSeparation"),
)


@dataclass
class DWI:
    """A diffusion-weighted series with its gradient table (see the module docs for units/frames).

    Attributes
    ----------
    data : ndarray, float32, shape (x, y, z, n)
        Image series in NIfTI order, volumes last.
    affine : ndarray (4, 4)
        Voxel-to-world matrix (mm).
    bvals : ndarray (n,)
        b-values in ms/µm².
    bvecs : ndarray (n, 3)
        Unit gradient directions in FSL's frame (zero rows allowed for b = 0 volumes).
    small_delta, big_delta : ndarray (n,) or None
        Gradient duration δ and separation Δ in ms.
    b0_threshold : float
        b-values at or below it (ms/µm²) count as b = 0.
    header : nibabel header or None
        Header of the NIfTI file, to write maps with the same geometry (``save_nifti(like=...)``).
    """

    data: np.ndarray
    affine: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    small_delta: np.ndarray | None = None
    big_delta: np.ndarray | None = None
    b0_threshold: float = B0_THRESHOLD
    header: Any = field(default=None, repr=False)

    @property
    def n_volumes(self) -> int:
        return int(self.bvals.shape[0])

    @property
    def b0_mask(self) -> np.ndarray:
        """Boolean ``(n,)``: the b = 0 volumes."""
        return self.bvals <= self.b0_threshold

    def mean_b0(self) -> np.ndarray:
        """Mean of the b = 0 volumes, ``(x, y, z)``."""
        return self.data[..., self.b0_mask].mean(axis=-1)

    def bvecs_voxel(self) -> np.ndarray:
        """Directions along the data array's axes (+i, +j, +k): FSL's x flip undone."""
        return fsl_bvecs_to_voxel(self.bvecs, self.affine)

    def bvecs_world(self) -> np.ndarray:
        """Directions in the affine's world frame (RAS+), unit rows ``(n, 3)``."""
        return fsl_bvecs_to_world(self.bvecs, self.affine)


# -------------------------------------------------------------------------------------------------
# frames
# -------------------------------------------------------------------------------------------------
def _linear_part(affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape not in ((4, 4), (3, 3)):
        raise ShapeError(f"affine must be 4x4 (or 3x3), got shape {a.shape}")
    m = a[:3, :3]
    if not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
        raise ParameterError(f"affine must be finite and invertible, got\n{a}")
    return m


def fsl_bvecs_to_voxel(bvecs: Any, affine: Any) -> np.ndarray:
    """FSL b-vectors ``(n, 3)`` → components along the data array's voxel axes (i, j, k).

    FSL negates the first component when ``det(affine[:3, :3]) > 0``; this undoes it.
    """
    g = np.array(bvecs, dtype=np.float64)
    if np.linalg.det(_linear_part(affine)) > 0:
        g[:, 0] = -g[:, 0]
    return g


def fsl_bvecs_to_world(bvecs: Any, affine: Any) -> np.ndarray:
    """FSL b-vectors ``(n, 3)`` → unit directions in the affine's world frame (RAS+).

    The voxel-frame vectors are rotated by the orthogonal factor ``R`` of the polar decomposition
    ``affine[:3, :3] = R·S`` (voxel sizes and any shear live in ``S``; a direction has no voxel
    size). For an affine without shear ``R`` is the affine's columns divided by the voxel sizes.
    """
    from scipy.linalg import polar

    rot, _ = polar(_linear_part(affine))
    return fsl_bvecs_to_voxel(bvecs, affine) @ rot.T


# -------------------------------------------------------------------------------------------------
# reading
# -------------------------------------------------------------------------------------------------
def _read_numbers(path: str | Path, what: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{what} file not found: {p}")
    rows = []
    for ln, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            rows.append([float(x) for x in line.replace(",", " ").split()])
        except ValueError as exc:
            raise DataFileError(
                f"{what} file {p}, line {ln}: not a list of numbers: {exc}"
            ) from exc
    if not rows:
        raise DataFileError(f"{what} file {p} holds no numbers")
    if len({len(r) for r in rows}) != 1:
        raise DataFileError(
            f"{what} file {p}: rows have different lengths {[len(r) for r in rows]}"
        )
    return np.asarray(rows, dtype=np.float64)


def read_bval(path: str | Path) -> np.ndarray:
    """FSL ``.bval`` file (s/mm², whitespace separated) → b-values ``(n,)`` in ms/µm²."""
    arr = _read_numbers(path, "bval")
    if 1 not in arr.shape:
        raise DataFileError(f"bval file {path} must hold one row (or one column), got {arr.shape}")
    return arr.reshape(-1) * S_PER_MM2_TO_MS_PER_UM2


def read_bvec(path: str | Path) -> np.ndarray:
    """FSL ``.bvec`` file (3 rows × n columns; n rows × 3 columns also accepted) → ``(n, 3)``."""
    arr = _read_numbers(path, "bvec")
    if arr.shape[0] == 3:
        return arr.T.copy()
    if arr.shape[1] == 3:
        return arr
    raise DataFileError(f"bvec file {path} must have 3 rows (x, y, z), got shape {arr.shape}")


def _per_volume(name: str, value: Any, n: int, source: str, unit: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64)).reshape(-1)
    if arr.size == 1:
        arr = np.full(n, arr[0])
    if arr.size != n:
        raise ShapeError(
            f"{source}: {name} has {arr.size} values but the series has {n} volumes; give one "
            "value per volume or a single value for all"
        )
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ParameterError(f"{source}: {name} must be finite and >= 0 {unit}, got {arr}")
    return arr


def read_dwi_protocol(path: str | Path, n_volumes: int) -> dict[str, np.ndarray]:
    """Protocol file (YAML or TSV, see module docs) → per-volume ``b``, ``small_delta``,
    ``big_delta`` arrays ``(n,)`` (only the keys present), b in ms/µm², δ and Δ in ms."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"diffusion protocol file not found: {p}")
    if p.suffix.lower() in (".tsv", ".txt", ".csv"):
        content = _read_tsv(p)
    else:
        import yaml

        try:
            content = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise DataFileError(f"diffusion protocol {p} is not valid YAML: {exc}") from exc
        if not isinstance(content, dict):
            raise DataFileError(
                f"diffusion protocol {p} must be a mapping with keys {PROTOCOL_COLUMNS}, got "
                f"{type(content).__name__}"
            )
    unknown = set(content) - set(PROTOCOL_COLUMNS) - {"description"}
    if unknown:
        raise ParameterError(
            f"diffusion protocol {p} has unknown keys {sorted(unknown)}; known keys: "
            f"{list(PROTOCOL_COLUMNS)} (b in ms/µm², small_delta and big_delta in ms)"
        )
    units = {"b": "ms/µm²", "small_delta": "ms", "big_delta": "ms"}
    return {
        k: _per_volume(k, content[k], n_volumes, f"protocol {p}", units[k])
        for k in PROTOCOL_COLUMNS
        if k in content
    }


def _read_tsv(p: Path) -> dict[str, list[float]]:
    lines = [ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) < 2:
        raise DataFileError(f"diffusion protocol {p} needs a header row and one row per volume")
    sep = "\t" if "\t" in lines[0] else ("," if "," in lines[0] else None)
    header = [h.strip() for h in lines[0].split(sep)]
    cols: dict[str, list[float]] = {h: [] for h in header}
    for i, ln in enumerate(lines[1:], 2):
        cells = ln.split(sep)
        if len(cells) != len(header):
            raise DataFileError(
                f"diffusion protocol {p}, row {i}: {len(cells)} cells, header has {len(header)}"
            )
        try:
            for h, c in zip(header, cells, strict=True):
                cols[h].append(float(c))
        except ValueError as exc:
            raise DataFileError(f"diffusion protocol {p}, row {i}: {exc}") from exc
    return cols


def read_dwi_sidecar(path: str | Path, n_volumes: int) -> dict[str, np.ndarray]:
    """δ and Δ (ms, per volume) from a JSON sidecar whose fields are in seconds (module docs)."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"JSON sidecar not found: {p}")
    try:
        meta = _json.loads(p.read_text())
    except ValueError as exc:
        raise DataFileError(f"JSON sidecar {p} is not valid JSON: {exc}") from exc
    out: dict[str, np.ndarray] = {}
    for small, big in SIDECAR_KEYS:
        for key, name in ((small, "small_delta"), (big, "big_delta")):
            if key in meta and name not in out:
                sec = _per_volume(key, meta[key], n_volumes, f"sidecar {p}", "s")
                if (sec >= 1.0).any():
                    raise ParameterError(
                        f"sidecar {p}: {key} = {meta[key]} looks like milliseconds; BIDS times are "
                        "in seconds (write e.g. 0.013), or give δ/Δ in ms in a protocol file"
                    )
                out[name] = sec * 1000.0
    return out


def check_gradients(
    bvals: Any, bvecs: Any, *, b0_threshold: float = B0_THRESHOLD, source: str = "gradients"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a gradient table and return ``(bvals (n,), unit bvecs (n, 3))``.

    Raises
    ------
    ShapeError
        Counts of b-values and b-vectors differ.
    ParameterError
        Negative or non-finite b, no b = 0 volume, a zero or non-unit (|1 − |g|| > 1e-2)
        b-vector for a diffusion-weighted volume.
    """
    b = np.asarray(bvals, dtype=np.float64).reshape(-1)
    g = np.asarray(bvecs, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != 3:
        raise ShapeError(f"{source}: b-vectors must have shape (n, 3), got {g.shape}")
    if g.shape[0] != b.size:
        raise ShapeError(f"{source}: {b.size} b-values but {g.shape[0]} b-vectors")
    if not np.isfinite(b).all():
        raise ParameterError(f"{source}: b-values contain NaN or Inf")
    # some tools write NaN vectors for b = 0 volumes (DIPY's small_64D does): read them as zero
    nan_b0 = ~np.isfinite(g).all(axis=1) & (b <= b0_threshold)
    g = np.where(nan_b0[:, None], 0.0, g)
    if not np.isfinite(g).all():
        idx = np.flatnonzero(~np.isfinite(g).all(axis=1))
        raise ParameterError(
            f"{source}: b-vectors of diffusion-weighted volumes {idx[:10].tolist()} contain NaN/Inf"
        )
    if (b < 0).any():
        raise ParameterError(
            f"{source}: negative b-values at volumes {np.flatnonzero(b < 0).tolist()}: {b[b < 0]}"
        )
    b0 = b <= b0_threshold
    if not b0.any():
        raise ParameterError(
            f"{source}: no b = 0 volume (none with b <= {b0_threshold} ms/µm² = "
            f"{b0_threshold * 1000:g} s/mm²); the signal normalisation needs at least one; "
            f"smallest b is {b.min():g} ms/µm²"
        )
    norm = np.linalg.norm(g, axis=1)
    zero = norm < UNIT_TOL
    bad = (np.abs(norm - 1.0) > UNIT_TOL) & ~(zero & b0)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ParameterError(
            f"{source}: b-vectors of volumes {idx[:10].tolist()} have lengths "
            f"{np.round(norm[idx[:10]], 4).tolist()}; diffusion-weighted volumes need unit vectors "
            f"(within {UNIT_TOL}), b = 0 volumes unit or zero vectors"
        )
    out = np.zeros_like(g)
    nz = ~zero
    out[nz] = g[nz] / norm[nz, None]
    return b, out


def load_dwi(
    nifti: str | Path,
    bval: str | Path | None,
    bvec: str | Path,
    *,
    protocol: str | Path | None = None,
    json: str | Path | None = None,
    b0_threshold: float = B0_THRESHOLD,
) -> DWI:
    """Read a 4D DWI NIfTI with its FSL gradient files and optional protocol/sidecar.

    Parameters
    ----------
    nifti : path
        4D image ``(x, y, z, n)``.
    bval : path or None
        FSL b-value file (s/mm²). May be None when ``protocol`` gives ``b``.
    bvec : path
        FSL b-vector file (3 × n), in FSL's frame (module docs).
    protocol : path, optional
        YAML/TSV file with per-volume ``b`` (ms/µm²), ``small_delta``, ``big_delta`` (ms).
    json : path, optional
        BIDS sidecar with δ/Δ in seconds (module docs). Protocol values win; if both give a
        value and they differ by more than 1e-3 ms, that is an error.
    b0_threshold : float
        b-values (ms/µm²) at or below it are b = 0 volumes.

    Returns
    -------
    DWI
    """
    data, affine, header = load_nifti(nifti, with_header=True)
    if data.ndim != 4:
        raise ShapeError(f"DWI image {nifti} must be 4D (x, y, z, volumes), got shape {data.shape}")
    n = data.shape[-1]
    proto = read_dwi_protocol(protocol, n) if protocol is not None else {}
    side = read_dwi_sidecar(json, n) if json is not None else {}
    if bval is not None:
        b = read_bval(bval)
        if "b" in proto and (b.size != n or not np.allclose(b, proto["b"], rtol=1e-2, atol=5e-3)):
            raise ParameterError(
                f"b-values of {bval} (÷1000: {np.round(b, 4).tolist()}) disagree with those of "
                f"protocol {protocol} ({np.round(proto['b'], 4).tolist()} ms/µm²)"
            )
    elif "b" in proto:
        b = proto["b"]
    else:
        raise ParameterError("no b-values: give a .bval file or a protocol file with 'b'")
    g = read_bvec(bvec)
    if b.size != n or g.shape[0] != n:
        raise ShapeError(
            f"DWI image {nifti} has {n} volumes but there are {b.size} b-values and "
            f"{g.shape[0]} b-vectors; every volume needs one of each"
        )
    b, g = check_gradients(b, g, b0_threshold=b0_threshold, source=str(bvec))
    timing: dict[str, np.ndarray] = {}
    for name in ("small_delta", "big_delta"):
        if name in proto and name in side and not np.allclose(proto[name], side[name], atol=1e-3):
            raise ParameterError(
                f"{name} differs between protocol {protocol} ({proto[name].tolist()} ms) and "
                f"sidecar {json} ({side[name].tolist()} ms)"
            )
        if name in proto or name in side:
            timing[name] = proto.get(name, side.get(name))
    return DWI(
        data=data.astype(np.float32, copy=False),
        affine=affine,
        bvals=b,
        bvecs=g,
        small_delta=timing.get("small_delta"),
        big_delta=timing.get("big_delta"),
        b0_threshold=float(b0_threshold),
        header=header,
    )


# -------------------------------------------------------------------------------------------------
# writing
# -------------------------------------------------------------------------------------------------
def save_dwi(
    directory: str | Path,
    data: Any,
    bvals: Any,
    bvecs: Any,
    *,
    affine: Any = None,
    small_delta: Any = None,
    big_delta: Any = None,
    frame: str = "fsl",
    stem: str = "dwi",
    protocol: str | None = "tsv",
    like: Any = None,
) -> dict[str, Path]:
    """Write a DWI series as users have it: NIfTI + FSL ``.bval``/``.bvec`` (+ protocol file).

    The inverse of :func:`load_dwi`: ``load_dwi(out["dwi"], out["bval"], out["bvec"],
    protocol=out.get("protocol"))`` gives back ``data`` (float32), ``bvals`` and the b-vectors
    (for b-values that are whole s/mm², and unit b-vectors, bit for bit).

    Parameters
    ----------
    directory : path
        Output folder (created if missing).
    data : array (x, y[, z], n)
        Series in NIfTI order, volumes last; a 2D series is written with a singleton z axis
        (a DWI file is 4D). Stored as float32.
    bvals : (n,) b-values in ms/µm²; written in s/mm² (× 1000, rounded to 1e-4 s/mm²).
    bvecs : (n, 3) unit directions in the frame named by ``frame``.
    affine : (4, 4), optional
        Voxel-to-world matrix (mm); default: that of ``like``, else 2 mm isotropic voxels.
    small_delta, big_delta : (n,) or float, optional
        δ and Δ in ms, written to the protocol file.
    frame : {"fsl", "voxel"}
        ``"fsl"``: ``bvecs`` are already in FSL's frame (as ``DWI.bvecs``) and are written as
        they are; ``"voxel"``: they are components along the data array's axes, and the first
        component is negated when ``det(affine) > 0``, as FSL defines (module docs).
    stem : str
        File names: ``<stem>.nii.gz``, ``<stem>.bval``, ``<stem>.bvec``, ``<stem>_protocol.tsv``.
    protocol : {"tsv", "yaml", None}
        Format of the protocol file with per-volume ``b`` (ms/µm²), ``small_delta`` and
        ``big_delta`` (ms); None, or no δ/Δ given: no protocol file.
    like : nibabel header, optional
        Header whose qform/sform codes the NIfTI keeps (as :func:`~qmrkit.io.save_nifti`).

    Returns
    -------
    dict
        Paths by role: ``"dwi"``, ``"bval"``, ``"bvec"`` and, when written, ``"protocol"``.
    """
    from .nifti import save_nifti

    arr = np.asarray(data, dtype=np.float32)
    b = np.asarray(bvals, dtype=np.float64).reshape(-1)
    g = np.asarray(bvecs, dtype=np.float64)
    if arr.ndim not in (3, 4):
        raise ShapeError(f"data must be (x, y[, z], n) with volumes last, got shape {arr.shape}")
    if arr.shape[-1] != b.size or g.shape != (b.size, 3):
        raise ShapeError(
            f"data has {arr.shape[-1]} volumes, bvals {b.size} values and bvecs shape {g.shape}; "
            "give one b-value and one (x, y, z) b-vector per volume"
        )
    if frame not in ("fsl", "voxel"):
        raise ParameterError(f"frame must be 'fsl' or 'voxel', got {frame!r}")
    if protocol not in ("tsv", "yaml", None):
        raise ParameterError(f"protocol must be 'tsv', 'yaml' or None, got {protocol!r}")
    if arr.ndim == 3:
        arr = arr[:, :, None, :]
    if affine is None:
        affine = like.get_best_affine() if like is not None else np.diag([2.0, 2.0, 2.0, 1.0])
    aff = np.asarray(affine, dtype=np.float64)
    if frame == "voxel":
        g = fsl_bvecs_to_voxel(g, aff)  # the flip is its own inverse
    out_dir = Path(directory)
    out = {"dwi": save_nifti(out_dir / f"{stem}.nii.gz", arr, affine=aff, like=like)}
    try:
        out["bval"] = out_dir / f"{stem}.bval"
        # whole s/mm² in practice; 4 decimals keep any b exactly as far as scanners give it
        b_smm2 = np.round(b / S_PER_MM2_TO_MS_PER_UM2, 4)
        out["bval"].write_text(" ".join(f"{v:.10g}" for v in b_smm2) + "\n")
        out["bvec"] = out_dir / f"{stem}.bvec"
        # repr-precision, so the vectors read back bit for bit
        out["bvec"].write_text(
            "\n".join(" ".join(repr(float(v)) for v in g[:, i]) for i in range(3)) + "\n"
        )
        timing = {
            name: _per_volume(name, v, b.size, "save_dwi", "ms")
            for name, v in (("small_delta", small_delta), ("big_delta", big_delta))
            if v is not None
        }
        if protocol is not None and timing:
            cols = {"b": b, **timing}
            if protocol == "tsv":
                out["protocol"] = out_dir / f"{stem}_protocol.tsv"
                rows = ["\t".join(cols)]
                rows += ["\t".join(repr(float(c[i])) for c in cols.values()) for i in range(b.size)]
                out["protocol"].write_text("\n".join(rows) + "\n")
            else:
                out["protocol"] = out_dir / f"{stem}_protocol.yaml"
                lines = ["# qmrkit DWI protocol: b in ms/µm², small_delta and big_delta in ms"]
                lines += [f"{k}: [{', '.join(repr(float(x)) for x in v)}]" for k, v in cols.items()]
                out["protocol"].write_text("\n".join(lines) + "\n")
    except OSError as exc:
        raise DataFileError(f"cannot write DWI files to {out_dir}: {exc}") from exc
    return out
