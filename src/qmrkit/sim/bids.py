"""A synthetic BIDS dataset with known truth (tests, benchmarks and docs of ``qmrkit batch``).

Subjects are cardiac phantoms (:func:`~qmrkit.sim.cardiac_phantom`) whose T1 is scaled by a
per-subject factor, so every subject has different maps. The dataset uses both BIDS forms a
qMRI input can take, and the inheritance principle:

* odd subjects (``sub-01``, ``sub-03``, ...): one 4D ``anat/sub-XX_MOLLI.nii.gz``; the
  ``InversionTime`` list comes from the top-level ``MOLLI.json`` (inherited), except for ``sub-03``
  whose own sidecar overrides it with other inversion times;
* even subjects: a file collection ``anat/sub-XX_inv-<i>_MOLLI.nii.gz``, one image per inversion,
  each with its own sidecar ``InversionTime`` (a number, overriding the top-level list);
* the last subject has two sessions (``ses-pre``, ``ses-post``) instead of none.

Optional extra inputs per subject: ``vfa`` (``flip-<i>_VFA`` collection with ``FlipAngle`` and
``RepetitionTimeExcitation``) and ``dti`` (``dwi/sub-XX_dwi.nii.gz`` + ``.bval``/``.bvec``).
All times in the sidecars are in seconds, as BIDS requires.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .phantoms import cardiac_phantom
from .relaxometry import MOLLI_TI, molli_series

#: inversion times (ms) of the subject whose sidecar overrides the top-level list
OTHER_TI = (120.0, 200.0, 280.0, 1100.0, 1180.0, 2000.0, 2100.0, 3000.0)
VFA_FLIPS = (3.0, 8.0, 15.0, 20.0)  # degrees
VFA_TR = 15.0  # ms
#: per-subject T1 scale factors (cycled)
T1_SCALES = (1.0, 0.9, 1.1, 0.95, 1.05, 0.85)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    nib.save(img, str(path))


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))


def bids_dataset(
    root: str | Path,
    *,
    n_subjects: int = 6,
    shape: Sequence[int] = (24, 24),
    snr: float | None = 60.0,
    models: Sequence[str] = ("molli",),
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Write the dataset (module docs) under ``root``; returns the truth per input label.

    Parameters
    ----------
    root : path
        Folder to create (it may exist; files are overwritten).
    n_subjects : int
        Subjects ``sub-01`` … (the last one with two sessions).
    shape : (nx, ny)
        In-plane size; images are written ``(nx, ny, 1)`` (BIDS images are 3D).
    snr : float or None
        Rician SNR of the series (None: noise-free).
    models : sequence of {"molli", "vfa", "dti"}
        Inputs to write per subject/session.
    seed : int
        Noise seeds are ``seed + subject index`` (+ 100 for the second session).

    Returns
    -------
    dict
        ``{"sub-01": {"T1": (nx, ny, 1) ms, "M0": ..., "ti": (n,) ms, "series": (nx, ny, 1, n)},
        "sub-06_ses-pre": {...}, ...}`` for MOLLI; VFA truth under ``"<label>/vfa"``, DTI under
        ``"<label>/dti"`` (``"D"``: (nx, ny, 1, 3, 3) µm²/ms).
    """
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        out / "dataset_description.json",
        {"Name": "qmrkit synthetic qMRI study", "BIDSVersion": "1.10.0", "DatasetType": "raw"},
    )
    # MOLLI is not a BIDS suffix (module docs): declared, so a validator accepts the raw dataset
    (out / ".bidsignore").write_text("*_MOLLI.*\nMOLLI.json\n")
    (out / "README").write_text("Synthetic qMRI dataset written by qmrkit.sim.bids_dataset.\n")
    participants = ["participant_id"]
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    _write_json(
        out / "MOLLI.json",
        {"InversionTime": [t / 1000 for t in MOLLI_TI], "MagneticFieldStrength": 1.5},
    )
    ph = cardiac_phantom(tuple(shape))
    t1_base = ph["T1"][..., None].astype(np.float64)
    m0 = 1000.0 * ph["PD"][..., None].astype(np.float64)
    truth: dict[str, dict[str, np.ndarray]] = {}
    for s in range(1, n_subjects + 1):
        sub = f"sub-{s:02d}"
        participants.append(sub)
        sessions = ["pre", "post"] if s == n_subjects else [None]
        for k, ses in enumerate(sessions):
            label = sub + (f"_ses-{ses}" if ses else "")
            folder = out / sub / (f"ses-{ses}" if ses else "")
            t1 = t1_base * T1_SCALES[(s - 1 + k) % len(T1_SCALES)]
            nseed = seed + s + 100 * k
            if "molli" in models:
                ti = OTHER_TI if s == 3 else MOLLI_TI
                series, _ = molli_series(t1, m0, ti, snr=snr, seed=nseed)
                truth[label] = {"T1": t1, "M0": m0, "ti": np.asarray(ti), "series": series}
                if s % 2:  # one 4D series
                    _write_nifti(folder / "anat" / f"{label}_MOLLI.nii.gz", series, affine)
                    if s == 3:
                        _write_json(
                            folder / "anat" / f"{label}_MOLLI.json",
                            {"InversionTime": [t / 1000 for t in ti]},
                        )
                else:  # inv-<i> collection, written in a shuffled order of the files' indices
                    order = np.random.default_rng(nseed).permutation(len(ti))
                    for idx, j in enumerate(order, start=1):
                        stem = folder / "anat" / f"{label}_inv-{idx}_MOLLI"
                        _write_nifti(Path(f"{stem}.nii.gz"), series[..., j], affine)
                        _write_json(Path(f"{stem}.json"), {"InversionTime": ti[j] / 1000})
            if "vfa" in models:
                truth[f"{label}/vfa"] = _write_vfa(folder, label, t1, m0, snr, nseed, affine)
            if "dti" in models:
                truth[f"{label}/dti"] = _write_dti(folder, label, shape, snr, nseed, affine)
    (out / "participants.tsv").write_text("\n".join(participants) + "\n")
    return truth


def _write_vfa(folder: Path, label: str, t1, m0, snr, seed, affine) -> dict[str, np.ndarray]:
    from .noise import add_noise

    a = np.deg2rad(np.asarray(VFA_FLIPS))
    e1 = np.exp(-VFA_TR / np.where(t1 > 0, t1, 1.0))[..., None]  # background: M0 = 0
    sig = m0[..., None] * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1)
    sigma = 0.0 if snr is None else float(m0.max()) * 0.1 / snr
    series = sig if snr is None else add_noise(sig, sigma, kind="rician", seed=seed)
    for i, fa in enumerate(VFA_FLIPS, start=1):
        stem = folder / "anat" / f"{label}_flip-{i}_VFA"
        _write_nifti(Path(f"{stem}.nii.gz"), series[..., i - 1], affine)
        _write_json(
            Path(f"{stem}.json"), {"FlipAngle": fa, "RepetitionTimeExcitation": VFA_TR / 1000}
        )
    return {"T1": t1, "M0": m0, "series": series}


def _write_dti(folder: Path, label: str, shape, snr, seed, affine) -> dict[str, np.ndarray]:
    """DTI with known tensors: an isotropic and a prolate tensor field (µm²/ms), b in s/mm²."""
    from .noise import add_noise

    rng = np.random.default_rng(seed)
    n_dirs = 20
    g = rng.normal(size=(n_dirs, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, 0.0, np.full(n_dirs, 1000.0)]
    bvecs = np.vstack([np.zeros((2, 3)), g])
    nx, ny = shape
    evals = np.array([1.7, 0.3, 0.3])
    d = np.zeros((nx, ny, 1, 3, 3))
    d[...] = np.diag(evals)
    d[: nx // 2] = np.eye(3) * 0.8  # half the image isotropic
    b_ms = bvals / 1000.0  # ms/µm²
    q = np.einsum("ni,...ij,nj->...n", bvecs, d, bvecs)
    sig = 1000.0 * np.exp(-b_ms * q)
    series = sig if snr is None else add_noise(sig, 1000.0 / snr, kind="rician", seed=seed)
    stem = folder / "dwi" / f"{label}_dwi"
    _write_nifti(Path(f"{stem}.nii.gz"), series, affine)
    Path(f"{stem}.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    Path(f"{stem}.bvec").write_text(
        "\n".join(" ".join(f"{v:.8f}" for v in row) for row in bvecs.T) + "\n"
    )
    _write_json(Path(f"{stem}.json"), {"EchoTime": 0.08})
    return {"D": d, "series": series}
