"""``qmrkit fit dti|nexi --dwi ...`` end to end through files: the maps equal the in-process
pipeline (and models.DTI), lie near the phantom's truth, and keep the DWI's geometry."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from qmrkit import fit
from qmrkit.cli import main
from qmrkit.io import load_dwi, load_nifti, save_nifti
from qmrkit.models import DTI
from qmrkit.pipelines import diffusion_maps
from qmrkit.sim import dwi_phantom, dwi_protocol

# a rotated, non-square affine with anisotropic voxels and det > 0 (so FSL flips x of the bvecs)
AFFINE = np.array(
    [
        [0.0, -2.5, 0.0, 40.0],
        [1.8, 0.0, 0.0, -30.0],
        [0.0, 0.0, 3.2, 12.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
NEXI_MAPS = {"fn": "f", "Dn": "Dn", "De": "De", "rn": "rn", "p2": "p2", "tex": "tex"}


def _subset_mask(ph, per_tissue: int, seed: int = 0) -> np.ndarray:
    """A few voxels of each tissue (NEXI's lm is ~0.05-0.1 s per voxel on a shared 2-core CPU)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(ph.labels.shape, bool)
    for lab in ph.tissues:
        idx = np.flatnonzero(ph.labels.reshape(-1) == lab)
        mask.reshape(-1)[rng.choice(idx, min(per_tissue, idx.size), replace=False)] = True
    return mask


@pytest.fixture(scope="module")
def nexi_run(tmp_path_factory):
    """Noise-free phantom → files → ``qmrkit fit nexi`` on 10 voxels per tissue."""
    tmp = tmp_path_factory.mktemp("nexi")
    ph = dwi_phantom((20, 20), snr=None, seed=0)
    paths = ph.save(tmp, affine=AFFINE)
    mask = _subset_mask(ph, 10)
    save_nifti(tmp / "sub.nii.gz", mask[:, :, None].astype(np.uint8), affine=AFFINE)
    argv = ["fit", "nexi", "--dwi", str(paths["dwi"]), "--bval", str(paths["bval"])]
    argv += ["--bvec", str(paths["bvec"]), "--protocol", str(paths["protocol"])]
    rc = main([*argv, "--mask", str(tmp / "sub.nii.gz"), "--out", str(tmp / "out"), "-q"])
    assert rc == 0
    return ph, paths, mask, tmp / "out"


def test_nexi_cli_maps_equal_the_pipeline_in_process(nexi_run):
    ph, paths, mask, out = nexi_run
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"], protocol=paths["protocol"])
    ref = diffusion_maps(dwi, "nexi", mask=mask[:, :, None], progress=False)
    for stem, name in NEXI_MAPS.items():
        got, _ = load_nifti(out / f"{stem}.nii.gz")
        want = ref.maps[name].numpy()
        assert got.shape == (20, 20, 1)
        np.testing.assert_array_equal(np.isnan(got), ~mask[:, :, None])
        np.testing.assert_allclose(got[..., 0][mask], want[..., 0][mask], rtol=1e-6)  # float32


def test_nexi_cli_maps_near_the_truth_noise_free(nexi_run):
    """Per tissue, the median relative error of the fitted maps (float32, lm, noise-free data).
    What is left comes from the invariants: 32 directions per shell alias the SH orders above the
    fit (l = 4) into S_0 and S_2 (measured on 129 grey/white-matter voxels: f 0.5 %, Dn 1.4 %,
    De 0.7 %, rn 3.2 %, p2 0.3 %); float64 gives the same numbers."""
    ph, _, mask, out = nexi_run
    tol = {"f": 0.02, "Dn": 0.05, "De": 0.03, "rn": 0.10, "p2": 0.02, "tex": 0.10}
    for stem, name in NEXI_MAPS.items():
        est, _ = load_nifti(out / f"{stem}.nii.gz")
        for lab in (4, 5):  # grey and white matter
            sel = mask & (ph.labels == lab)
            rel = np.abs(est[:, :, 0][sel] - ph.truth[name][sel]) / ph.truth[name][sel]
            assert np.median(rel) < tol[name], (stem, ph.tissues[lab], np.median(rel))
    # CSF (free water): no neurites, De = 3 µm²/ms
    csf = mask & (ph.labels == 3)
    fn, _ = load_nifti(out / "fn.nii.gz")
    de, _ = load_nifti(out / "De.nii.gz")
    assert np.abs(fn[:, :, 0][csf]).max() < 1e-3
    np.testing.assert_allclose(de[:, :, 0][csf], 3.0, rtol=1e-3)


def test_nexi_maps_keep_geometry_units_and_provenance(nexi_run):
    _, paths, _, out = nexi_run
    src = nib.load(str(paths["dwi"]))
    for stem in NEXI_MAPS:
        img = nib.load(str(out / f"{stem}.nii.gz"))
        np.testing.assert_array_equal(img.affine, src.affine)
        assert int(img.header["qform_code"]) == int(src.header["qform_code"]) == 1
        assert int(img.header["sform_code"]) == int(src.header["sform_code"]) == 1
    units = {"fn": "", "Dn": "µm²/ms", "De": "µm²/ms", "rn": "1/ms", "p2": "", "tex": "ms"}
    for stem, unit in units.items():
        side = json.loads((out / f"{stem}.json").read_text())
        assert side["Units"] == unit and side["Model"] == "nexi" and side["Solver"] == "lm"
        assert side["InputFiles"]["protocol"] == str(paths["protocol"])
        assert side["Sources"] == [str(paths["dwi"])]
    side = json.loads((out / "fit.json").read_text())
    assert side["InvariantOrders"] == [0, 2]
    assert sorted(side["Shells"]["big_delta_ms"]) == [13.0] * 4 + [21.0] * 5 + [30.0] * 6
    assert (out / "maps.png").exists()


@pytest.fixture(scope="module")
def dti_run(tmp_path_factory):
    """DTI protocol (b = 1 ms/µm², 30 directions, 2 b = 0), SNR 50, the rotated affine."""
    tmp = tmp_path_factory.mktemp("dti")
    prot = dwi_protocol(((20.0, (1.0,)),), n_dirs=30, n_b0=2)
    ph = dwi_phantom((24, 20), protocol=prot, snr=50, seed=4)
    paths = ph.save(tmp, affine=AFFINE, protocol="yaml")
    argv = ["fit", "dti", "--dwi", str(paths["dwi"]), "--bval", str(paths["bval"])]
    argv += ["--bvec", str(paths["bvec"]), "--mask", str(paths["mask"]), "--no-figure"]
    assert main([*argv, "--out", str(tmp / "out"), "-q"]) == 0
    return ph, paths, tmp / "out"


def test_dti_cli_equals_models_dti_in_process(dti_run):
    ph, paths, out = dti_run
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"])
    ref = fit.lm(DTI.from_dwi(dwi), dwi.data, mask=ph.mask[:, :, None], progress=False)
    files = {"FA": "FA", "MD": "MD", "AD": "AD", "RD": "RD", "S0map": "S0", "L1": "L1"}
    files.update({f"V1{c}": f"V1{c}" for c in "xyz"})
    for stem, name in files.items():
        got, aff = load_nifti(out / f"{stem}.nii.gz")
        want = ref.maps[name].numpy()
        g, w = got[..., 0][ph.mask], want[..., 0][ph.mask]
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(aff, dwi.affine)
    v1, _ = load_nifti(out / "V1.nii.gz")
    assert v1.shape == (24, 20, 1, 3)
    for i, c in enumerate("xyz"):
        np.testing.assert_array_equal(v1[..., i], load_nifti(out / f"V1{c}.nii.gz")[0])


def test_dti_orientation_survives_the_files(dti_run):
    """V1 is written in FSL's frame (as dtifit): undoing FSL's x flip for this det > 0 affine gives
    the phantom's voxel-frame fibre direction in white matter; without the flip it would not."""
    ph, _, out = dti_run
    v1, _ = load_nifti(out / "V1.nii.gz")
    v1 = v1[:, :, 0]
    wm = ph.labels == 5
    truth = ph.truth["V1"][wm]
    voxel = v1[wm] * np.array([-1.0, 1.0, 1.0])  # det(AFFINE) > 0
    cos = np.abs((voxel * truth).sum(-1))
    assert np.median(cos) > 0.99
    unflipped = np.abs((v1[wm] * truth).sum(-1))
    assert np.median(unflipped) < 0.9
    fa, _ = load_nifti(out / "FA.nii.gz")
    # at b = 1 the tensor sees the kurtosis of the two-compartment signal; FA still orders tissues
    assert np.median(fa[:, :, 0][wm]) > np.median(fa[:, :, 0][ph.labels == 4]) + 0.2


@pytest.mark.slow  # four small NEXI fits, ≈ 30-45 s on 2 shared cores
@pytest.mark.filterwarnings("ignore::qmrkit.errors.ConvergenceWarning")  # adam: 40 iterations
def test_adam_tv_and_mcmc_through_the_cli_equal_the_pipeline(tmp_path):
    """The adam+TV and MCMC paths: files equal the in-process pipeline with the same settings,
    sidecars record the TV terms and the posterior maps."""
    ph = dwi_phantom((12, 12), protocol=dwi_protocol(n_dirs=16, n_b0=1), snr=50, seed=2)
    paths = ph.save(tmp_path)
    mask = _subset_mask(ph, 3, seed=1)
    save_nifti(tmp_path / "sub.nii.gz", mask[:, :, None].astype(np.uint8), affine=ph.affine)
    base = ["fit", "nexi", "--dwi", str(paths["dwi"]), "--bval", str(paths["bval"]), "--bvec"]
    base += [str(paths["bvec"]), "--protocol", str(paths["protocol"]), "--no-figure", "-q"]
    base += ["--mask", str(tmp_path / "sub.nii.gz")]
    tv = ["--tv", "fn:0.001", "--tv", "rn:0.002", "--tv-dims", "2"]
    base += ["--max-iter", "40"]
    assert main([*base, "--solver", "adam", *tv, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--solver", "mcmc", "--out", str(tmp_path / "m")]) == 0
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"], protocol=paths["protocol"])
    sel = mask[:, :, None]
    tv_terms = {"fn": 0.001, "rn": 0.002}
    a = diffusion_maps(
        dwi, "nexi", mask=sel, solver="adam", tv=tv_terms, tv_dims=2, max_iter=40, progress=False
    )
    got, _ = load_nifti(tmp_path / "a" / "fn.nii.gz")
    np.testing.assert_allclose(got[sel], a.maps["f"].numpy()[sel], rtol=1e-6)
    side = json.loads((tmp_path / "a" / "fn.json").read_text())
    terms = side["TotalVariation"]["terms"]
    assert [(t["parameters"], t["weight"], t["dims"]) for t in terms] == [
        (["f"], 0.001, 2),
        (["rn"], 0.002, 2),
    ]
    m = diffusion_maps(dwi, "nexi", mask=sel, solver="mcmc", max_iter=40, progress=False)
    for stat in ("mean", "std"):
        got, _ = load_nifti(tmp_path / "m" / f"fn_{stat}.nii.gz")
        want = getattr(m.result, stat)["f"].numpy()
        np.testing.assert_allclose(got[sel], want[sel], rtol=1e-6)
    side = json.loads((tmp_path / "m" / "fn_mean.json").read_text())
    assert side["Model"] == "nexi" and side["InputFiles"]["dwi"] == str(paths["dwi"])


def test_models_lists_the_diffusion_models_and_what_they_need(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and not ln.startswith(" ")}
    assert "--dwi, --bvec and --bval" in lines["dti"]
    assert "big_delta column (--protocol)" in lines["nexi"] and "BigDelta" in lines["nexi"]
    assert "rn       [0.004, 1] 1/ms" in out and "L33" in out


def test_invariant_models_fit_only_the_mask(tmp_path):
    """The pipeline's chunked, masked invariants equal rotational_invariants on the whole image."""
    from qmrkit.models.diffusion import rotational_invariants
    from qmrkit.pipelines import diffusion as pd

    ph = dwi_phantom((14, 12), protocol=dwi_protocol(n_dirs=12), snr=30, seed=3)
    paths = ph.save(tmp_path)
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"], protocol=paths["protocol"])
    sel = ph.mask[:, :, None]
    old = pd.INVARIANT_CHUNK
    try:
        pd.INVARIANT_CHUNK = 7  # several chunks
        inv = pd._masked_invariants(dwi, sel, 2)
    finally:
        pd.INVARIANT_CHUNK = old
    ref = rotational_invariants(
        dwi.data, dwi.bvals, dwi.bvecs, small_delta=dwi.small_delta, big_delta=dwi.big_delta
    )
    np.testing.assert_allclose(inv.values[sel], ref.values[sel], rtol=1e-12)
    assert np.isnan(inv.values[~sel]).all()
    np.testing.assert_array_equal(inv.b, ref.b)


@pytest.mark.slow  # two subprocesses (torch import each), ≈ 20-40 s on 2 shared cores
def test_progress_bar_on_a_terminal_and_silent_with_quiet(tmp_path):
    """As for relaxometry (the same _progress decision): a bar on a terminal, none with --quiet."""
    from tests.cli.test_progress import _stderr_on_a_terminal

    ph = dwi_phantom((10, 10), protocol=dwi_protocol(((20.0, (1.0,)),), n_dirs=12), seed=1)
    p = ph.save(tmp_path)
    argv = ["fit", "dti", "--dwi", str(p["dwi"]), "--bval", str(p["bval"]), "--bvec"]
    argv += [str(p["bvec"]), "--no-figure"]
    rc, err = _stderr_on_a_terminal([*argv, "--out", str(tmp_path / "a")])
    assert rc == 0 and "lm:" in err and "voxel" in err
    rc, err = _stderr_on_a_terminal([*argv, "--out", str(tmp_path / "b"), "--quiet"])
    assert rc == 0 and err == ""
