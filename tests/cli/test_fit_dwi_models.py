"""``qmrkit fit axcalibersmt|sandi`` on NIfTI + bval + bvec + protocol files written from the
AxCaliberSMT / SANDI phantom (SNR 50): the maps equal the in-process pipeline on the same files,
carry units, and lie near the truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qmrkit.cli import main
from qmrkit.io import load_dwi, load_nifti, save_nifti
from qmrkit.pipelines import diffusion_maps
from qmrkit.sim import dwi_phantom

# a rotated affine with det > 0 (FSL flips x of the b-vectors; the invariants must not care)
AFFINE = np.array(
    [
        [0.0, -2.5, 0.0, 40.0],
        [1.8, 0.0, 0.0, -30.0],
        [0.0, 0.0, 3.2, 12.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
MAPS = {
    "axcalibersmt": {
        "AxonDiameter": ("a", "µm"),
        "fIntraAxonalRel": ("f", ""),
        "fCSF": ("fcsf", ""),
        "DeRadial": ("DeR", "µm²/ms"),
        "fIntraAxonal": ("fr", ""),
    },
    "sandi": {
        "fSoma": ("fs", ""),
        "fNeuriteRel": ("fnr", ""),
        "Dneurite": ("Dn", "µm²/ms"),
        "Rsoma": ("Rs", "µm"),
        "Dextra": ("De", "µm²/ms"),
        "fNeurite": ("fn", ""),
    },
}


@pytest.fixture(scope="module", params=["axcalibersmt", "sandi"])
def run(request, tmp_path_factory):
    """SNR 50 phantom → files → ``qmrkit fit MODEL`` on 12 grey- and 12 white-matter voxels."""
    model = request.param
    tmp = tmp_path_factory.mktemp(model)
    ph = dwi_phantom((20, 20), model=model, snr=50, seed=5)
    paths = ph.save(tmp, affine=AFFINE, protocol="yaml" if model == "sandi" else "tsv")
    rng = np.random.default_rng(0)
    mask = np.zeros(ph.labels.shape, bool)
    for lab in (4, 5):
        idx = np.flatnonzero(ph.labels.reshape(-1) == lab)
        mask.reshape(-1)[rng.choice(idx, 12, replace=False)] = True
    save_nifti(tmp / "sub.nii.gz", mask[:, :, None].astype(np.uint8), affine=AFFINE)
    argv = ["fit", model, "--dwi", str(paths["dwi"]), "--bval", str(paths["bval"])]
    argv += ["--bvec", str(paths["bvec"]), "--protocol", str(paths["protocol"]), "--no-figure"]
    rc = main([*argv, "--mask", str(tmp / "sub.nii.gz"), "--out", str(tmp / "out"), "-q"])
    assert rc == 0
    return model, ph, paths, mask, tmp / "out"


def test_cli_maps_equal_the_pipeline_in_process(run):
    model, ph, paths, mask, out = run
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"], protocol=paths["protocol"])
    ref = diffusion_maps(dwi, model, mask=mask[:, :, None], progress=False)
    for stem, (name, unit) in MAPS[model].items():
        got, aff = load_nifti(out / f"{stem}.nii.gz")
        np.testing.assert_array_equal(aff, dwi.affine)  # the DWI's (float32 in NIfTI)
        np.testing.assert_array_equal(np.isnan(got[..., 0]), ~mask)
        np.testing.assert_allclose(
            got[..., 0][mask], ref.maps[name].numpy()[..., 0][mask], rtol=1e-6
        )
        side = json.loads((out / f"{stem}.json").read_text())
        assert side["Units"] == unit and side["Model"] == model and side["Solver"] == "lm"
    side = json.loads((out / "fit.json").read_text())
    assert side["InvariantOrders"] == [0]
    assert sorted(set(side["Shells"]["small_delta_ms"])) == [8.0]


def test_cli_maps_near_the_truth(run):
    """24 voxels: the median relative error over grey and white matter together of the
    parameters each model determines best at SNR 50 (in-process bounds: test_diffusion_recovery)."""
    model, ph, _, mask, out = run
    tol = {
        "axcalibersmt": {"AxonDiameter": 0.10, "fIntraAxonalRel": 0.07},
        "sandi": {"fSoma": 0.10, "Rsoma": 0.06, "fNeurite": 0.12},
    }[model]
    for stem, t in tol.items():
        name = MAPS[model][stem][0]
        est, _ = load_nifti(out / f"{stem}.nii.gz")
        rel = np.abs(est[..., 0][mask] - ph.truth[name][mask]) / ph.truth[name][mask]
        assert np.median(rel) < t, (stem, np.median(rel))
