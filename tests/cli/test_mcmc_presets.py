"""``--solver mcmc --mcmc-preset gacelle-mh|gacelle-ensemble``: GACELLE's table-1 sampler settings
(paper 004: 10 % burn-in, thinning 100, 900 posterior samples; MH 4 proposals × 25,000
iterations, ensemble 50 walkers × 2,000 iterations) reach fit.mcmc, as mcmc.json records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qmrkit.cli import main
from qmrkit.errors import ParameterError
from qmrkit.io import load_dwi, load_nifti, save_nifti
from qmrkit.pipelines import MCMC_PRESETS, diffusion_maps
from qmrkit.sim import dwi_phantom


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """AxCaliberSMT phantom (GACELLE demo 2's model and protocol) at SNR 30, two white-matter
    voxels."""
    tmp = tmp_path_factory.mktemp("presets")
    ph = dwi_phantom((12, 12), model="axcalibersmt", snr=30, seed=1)
    paths = ph.save(tmp)
    mask = np.zeros(ph.labels.shape, bool)
    mask.reshape(-1)[np.flatnonzero(ph.labels.reshape(-1) == 5)[:2]] = True
    save_nifti(tmp / "two.nii.gz", mask[:, :, None].astype(np.uint8), affine=ph.affine)
    argv = ["fit", "axcalibersmt", "--dwi", str(paths["dwi"]), "--bval", str(paths["bval"])]
    argv += ["--bvec", str(paths["bvec"]), "--protocol", str(paths["protocol"]), "--no-figure"]
    argv += ["--mask", str(tmp / "two.nii.gz"), "--solver", "mcmc", "-q"]
    return tmp, argv, paths, mask


def _settings(out):
    return json.loads((out / "mcmc.json").read_text())


@pytest.mark.slow  # 2,000 ensemble steps of 50 walkers: ≈ 1-3 min on 2 shared cores
def test_ensemble_preset_reaches_the_sampler(files):
    tmp, argv, paths, mask = files
    out = tmp / "ens"
    assert main([*argv, "--mcmc-preset", "gacelle-ensemble", "--out", str(out)]) == 0
    side = _settings(out)
    s = side["Settings"]
    assert side["Method"] == s["method"] == "ensemble"
    assert (s["n_walkers"], s["n_steps"], s["burnin"], s["thin"]) == (50, 2000, 200, 100)
    assert s["samples_per_voxel"] == 900  # GACELLE's 900 posterior samples
    fn = json.loads((out / "fIntraAxonalRel_mean.json").read_text())
    assert fn["McmcPreset"]["name"] == "gacelle-ensemble"
    assert fn["McmcPreset"]["settings"] == MCMC_PRESETS["gacelle-ensemble"]


@pytest.mark.slow  # 25,000 MH steps on 2 voxels: ≈ 1-3 min on 2 shared cores
def test_mh_preset_reaches_the_sampler(files):
    tmp, argv, _, _ = files
    out = tmp / "mh"
    assert main([*argv, "--mcmc-preset", "gacelle-mh", "--out", str(out)]) == 0
    s = _settings(out)["Settings"]
    assert s["method"] == "mh"
    assert (s["n_walkers"], s["n_steps"], s["burnin"], s["thin"]) == (4, 25000, 2500, 100)
    assert s["samples_per_voxel"] == 900


def test_max_iter_overrides_the_preset_steps_and_equals_the_pipeline(files):
    """--max-iter replaces the preset's steps (burn-in stays 10 %); the files equal
    ``diffusion_maps(..., mcmc_preset=...)`` with the same steps."""
    tmp, argv, paths, mask = files
    out = tmp / "mh_short"
    assert (
        main([*argv, "--mcmc-preset", "gacelle-mh", "--max-iter", "1000", "--out", str(out)]) == 0
    )
    s = _settings(out)["Settings"]
    assert (s["method"], s["n_walkers"], s["n_steps"], s["burnin"], s["thin"]) == (
        "mh",
        4,
        1000,
        100,
        100,
    )
    assert s["samples_per_voxel"] == 4 * ((1000 - 100) // 100)
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"], protocol=paths["protocol"])
    ref = diffusion_maps(
        dwi,
        "axcalibersmt",
        mask=mask[:, :, None],
        solver="mcmc",
        mcmc_preset="gacelle-mh",
        max_iter=1000,
        progress=False,
    )
    assert ref.result.settings["n_walkers"] == 4 and ref.result.settings["thin"] == 100

    got, _ = load_nifti(out / "AxonDiameter_mean.nii.gz")
    sel = mask[:, :, None]
    np.testing.assert_allclose(got[sel], ref.result.mean["a"].numpy()[sel], rtol=1e-6)


def test_ensemble_preset_with_fewer_steps(files):
    """The quick check of the ensemble preset: 50 walkers, thinning 100, 10 % burn-in of the
    steps --max-iter gives."""
    tmp, argv, _, _ = files
    out = tmp / "ens_short"
    rc = main([*argv, "--mcmc-preset", "gacelle-ensemble", "--max-iter", "300", "--out", str(out)])
    assert rc == 0
    s = _settings(out)["Settings"]
    assert (s["method"], s["n_walkers"], s["n_steps"], s["burnin"], s["thin"]) == (
        "ensemble",
        50,
        300,
        30,
        100,
    )
    assert s["samples_per_voxel"] == 50 * ((300 - 30) // 100)


def test_pipeline_refuses_unknown_or_misplaced_presets(files):
    _, _, paths, mask = files
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"], protocol=paths["protocol"])
    with pytest.raises(ParameterError, match="must be one of gacelle-mh, gacelle-ensemble"):
        diffusion_maps(dwi, "axcalibersmt", solver="mcmc", mcmc_preset="emcee")
    with pytest.raises(ParameterError, match="applies to --solver mcmc only"):
        diffusion_maps(dwi, "axcalibersmt", solver="lm", mcmc_preset="gacelle-mh")
