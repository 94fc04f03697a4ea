"""``qmrkit fit three-pool-gre|mcr-mwi`` end to end on complex NIfTI phantoms.

The boundary test: the MWF map the CLI writes equals, to float32 precision, the in-process
:func:`qmrkit.pipelines.fit_maps` result on the same data (same model, settings, solver and
dtype); and it is near the known truth of the phantom (noise-free data; for MCR-MWI simulated with
the *direct* EPG-X model, so the surrogate's error is part of what is tested). Bad requests exit 2
with one line naming what was expected.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qmrkit.cli import main
from qmrkit.io import load_nifti, save_nifti
from qmrkit.models.myelin import McrMwi, ThreePoolGRE, train_mcr_mwi_surrogate
from qmrkit.pipelines.series import fit_maps

SHAPE = (4, 4, 1)
N = 16
TE_NAM = np.arange(1, 25) * 2.0  # ms
FA = [5.0, 10.0, 20.0, 40.0, 70.0]  # deg
TE_MCR = np.arange(1, 11) * 3.0  # ms
TR = 45.0  # ms
FIX = {"df_MW": 5.0, "df_AW": -2.0}
RANGES = {
    "MWF": (0.02, 0.3, "lin", ""),
    "T1_IEW": (700.0, 1500.0, "log", "ms"),
    "k_IEW": (0.0, 6.0, "lin", "1/s"),
    "alpha": (3.0, 80.0, "lin", "deg"),
}
MWF_TRUE = np.r_[np.full(8, 0.15), np.full(8, 0.05)]  # "WM" rows then "GM" rows


def _csv(x) -> str:
    return ",".join(f"{float(v):g}" for v in x)


@pytest.fixture(scope="module")
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def nam_files(tmp_path_factory, single_thread):
    """Noise-free three-pool phantom: complex NIfTI, and the same as magnitude + phase."""
    d = tmp_path_factory.mktemp("nam")
    rng = np.random.default_rng(0)
    one = np.ones(N)
    p = dict(
        A_MW=MWF_TRUE,
        A_AW=(1 - MWF_TRUE) * 0.6,
        A_EW=(1 - MWF_TRUE) * 0.4,
        T2s_MW=10.0 * one,
        T2s_AW=64.0 * one,
        T2s_EW=48.0 * one,
        df_MW=FIX["df_MW"] * one,
        df_AW=FIX["df_AW"] * one,
        f_bg=rng.uniform(-20, 20, N),
        phi0=rng.uniform(-2, 2, N),
    )
    z = ThreePoolGRE(TE_NAM).simulate(p).numpy().reshape(*SHAPE, -1).astype(np.complex64)
    save_nifti(d / "gre.nii.gz", z)
    save_nifti(d / "mag.nii.gz", np.abs(z).astype(np.float32))
    save_nifti(d / "phase.nii.gz", np.angle(z).astype(np.float32))
    return d, z


@pytest.fixture(scope="module")
def mcr_files(tmp_path_factory, single_thread):
    """A small MCR-MWI surrogate for TR 45 ms, and a noise-free phantom made by direct EPG-X."""
    d = tmp_path_factory.mktemp("mcr")
    sur = train_mcr_mwi_surrogate(
        TR,
        ranges=RANGES,
        n_train=1024,
        n_val=256,
        n_test=256,
        hidden=(32, 32),
        max_epochs=150,
        batch_size=128,
        lr=1e-2,
        patience=30,
        threads=1,
        tol=1e-3,
        seed=0,
    )
    sur.save(d / "epgx.safetensors")
    rng = np.random.default_rng(1)
    one = np.ones(N)
    p = dict(
        S0=rng.uniform(0.8, 1.2, N),
        MWF=MWF_TRUE,
        fAW=0.6 * one,
        T2s_MW=10.0 * one,
        T2s_AW=64.0 * one,
        T2s_EW=48.0 * one,
        T1_IEW=np.r_[np.full(8, 950.0), np.full(8, 1300.0)],
        k_IEW=2.0 * one,
        df_MW=FIX["df_MW"] * one,
        df_AW=FIX["df_AW"] * one,
        f_bg=rng.uniform(-20, 20, N),
        phi0=rng.uniform(-2, 2, N),
    )
    b1 = rng.uniform(0.9, 1.1, N)
    z = McrMwi(FA, TE_MCR, TR, None).simulate(p, b1=b1).numpy()
    z = z.reshape(*SHAPE, -1).astype(np.complex64)
    save_nifti(d / "gre.nii.gz", z)
    save_nifti(d / "b1.nii.gz", b1.reshape(SHAPE).astype(np.float32))
    save_nifti(d / "real.nii.gz", np.abs(z).astype(np.float32))
    save_nifti(d / "short.nii.gz", z[..., : -len(TE_MCR)])
    return d, z, b1.reshape(SHAPE)


def _run(args: list[str]) -> int:
    return main([*args, "--no-figure", "--quiet", "--threads", "1"])


def test_three_pool_cli_equals_fit_maps_and_truth(nam_files, tmp_path):
    d, z = nam_files
    out = tmp_path / "out"
    fix = "df_MW=5,df_AW=-2"
    assert _run(["fit", "three-pool-gre", "--data", str(d / "gre.nii.gz"), "--te",
                 _csv(TE_NAM), "--fix", fix, "--mask", "none", "--out", str(out)]) == 0  # fmt: skip
    mwf_cli, _ = load_nifti(out / "MWFmap.nii.gz")
    ref = fit_maps(z, "three-pool-gre", {"te": list(TE_NAM), "fixed": FIX}, mask=None)
    mwf_ref = ref.maps["MWF"].numpy().reshape(SHAPE)
    np.testing.assert_allclose(mwf_cli, mwf_ref, rtol=1e-6, atol=1e-7)  # the boundary
    np.testing.assert_allclose(mwf_cli.reshape(-1), MWF_TRUE, atol=1e-4)  # near truth (noise-free)
    sidecar = json.loads((out / "MWFmap.json").read_text())
    assert sidecar["Units"] == "" and sidecar["Acquisition"]["fixed"] == FIX
    t2s = json.loads((out / "T2s_MW.json").read_text())
    assert t2s["Units"] == "ms"
    assert json.loads((out / "fit.json").read_text())["Model"] == "three-pool-gre"
    assert not (out / "df_MW.nii.gz").exists()  # held constant, not a map

    # magnitude + phase (radians) give the same fit as the complex file
    out2 = tmp_path / "out2"
    assert _run(["fit", "threepoolgre", "--data", str(d / "mag.nii.gz"), "--phase",
                 str(d / "phase.nii.gz"), "--te", _csv(TE_NAM), "--fix", fix, "--mask", "none",
                 "--out", str(out2)]) == 0  # fmt: skip
    mwf2, _ = load_nifti(out2 / "MWFmap.nii.gz")
    np.testing.assert_allclose(mwf2, mwf_cli, atol=1e-3)


def test_mcr_mwi_cli_surrogate_equals_fit_maps_and_truth(mcr_files, tmp_path):
    d, z, b1 = mcr_files
    out = tmp_path / "out"
    sur = d / "epgx.safetensors"
    assert _run(["fit", "mcr-mwi", "--data", str(d / "gre.nii.gz"), "--fa", _csv(FA), "--te",
                 _csv(TE_MCR), "--tr", str(TR), "--b1", str(d / "b1.nii.gz"), "--surrogate",
                 str(sur), "--fix", "df_MW=5,df_AW=-2", "--mask", "none",
                 "--out", str(out)]) == 0  # fmt: skip
    mwf_cli, _ = load_nifti(out / "MWFmap.nii.gz")
    settings = {
        "flip_angles": FA,
        "te": list(TE_MCR),
        "tr": TR,
        "surrogate": str(sur),
        "fixed": FIX,
        "b1": b1,
    }
    ref = fit_maps(z, "mcr-mwi", settings, mask=None)
    np.testing.assert_allclose(
        mwf_cli, ref.maps["MWF"].numpy().reshape(SHAPE), rtol=1e-6, atol=1e-7
    )
    # data from direct EPG-X, fitted through the surrogate: within 0.01 of truth per voxel
    np.testing.assert_allclose(mwf_cli.reshape(-1), MWF_TRUE, atol=0.01)
    t1, _ = load_nifti(out / "T1map.nii.gz")
    np.testing.assert_allclose(
        t1.reshape(-1), np.r_[np.full(8, 950.0), np.full(8, 1300.0)], rtol=0.05
    )
    awf, _ = load_nifti(out / "AWF.nii.gz")
    ewf, _ = load_nifti(out / "EWF.nii.gz")
    np.testing.assert_allclose(mwf_cli + awf + ewf, 1.0, atol=1e-5)
    assert json.loads((out / "T1map.json").read_text())["Units"] == "ms"
    fitjson = json.loads((out / "fit.json").read_text())
    assert fitjson["Model"] == "mcr-mwi" and fitjson["Acquisition"]["surrogate"] == str(sur)
    assert fitjson["Surrogate"]["Acquisition"]["tr"] == TR
    assert fitjson["Surrogate"]["Ranges"]["T1_IEW"][:2] == [700.0, 1500.0]

    # the same request from a protocol file naming the surrogate next to it
    (d / "mcr.yaml").write_text(
        f"model: mcr-mwi\nflip_angles: [{_csv(FA)}]\nte: [{_csv(TE_MCR)}]\ntr: {TR}\n"
        "surrogate: epgx.safetensors\nfixed: {df_MW: 5.0, df_AW: -2.0}\n"
    )
    out2 = tmp_path / "out2"
    assert _run(["fit", "MCR_MWI", "--data", str(d / "gre.nii.gz"), "--protocol",
                 str(d / "mcr.yaml"), "--b1", str(d / "b1.nii.gz"), "--mask", "none",
                 "--out", str(out2)]) == 0  # fmt: skip
    np.testing.assert_array_equal(load_nifti(out2 / "MWFmap.nii.gz")[0], mwf_cli)


@pytest.mark.slow
def test_mcr_mwi_cli_direct_epgx(mcr_files, tmp_path, capsys):
    """Without --surrogate: a warning line, and the exact model recovers the truth of two voxels
    (one "WM", one "GM") simulated by the same direct EPG-X."""
    d, z, b1 = mcr_files
    two = z[[0, 2], [0, 0]][:, None]  # voxels 0 (MWF 0.15) and 8 (MWF 0.05): shape (2, 1, 1, n)
    save_nifti(tmp_path / "two.nii.gz", two)
    save_nifti(tmp_path / "b1.nii.gz", b1[[0, 2], [0, 0]][:, None])
    out = tmp_path / "out"
    assert main(["fit", "mcr-mwi", "--data", str(tmp_path / "two.nii.gz"), "--fa", _csv(FA),
                 "--te", _csv(TE_MCR), "--tr", str(TR), "--b1", str(tmp_path / "b1.nii.gz"),
                 "--fix", "df_MW=5,df_AW=-2", "--mask", "none", "--out", str(out), "--no-figure",
                 "--threads", "1"]) == 0  # fmt: skip
    assert "without --surrogate simulates EPG-X directly" in capsys.readouterr().err
    mwf, _ = load_nifti(out / "MWFmap.nii.gz")
    np.testing.assert_allclose(mwf.reshape(-1), [0.15, 0.05], atol=2e-3)


def _error(capsys, args: list[str]) -> str:
    assert _run(args) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmrkit fit: error: "), err
    return lines[0]


def test_mcr_mwi_cli_errors(mcr_files, tmp_path, capsys):
    d, _, _ = mcr_files
    base = ["fit", "mcr-mwi", "--fa", _csv(FA), "--te", _csv(TE_MCR), "--mask", "none"]
    gre, sur, out = str(d / "gre.nii.gz"), str(d / "epgx.safetensors"), str(tmp_path / "o")
    # real data given to a complex model
    line = _error(capsys, [*base, "--tr", "45", "--data", str(d / "real.nii.gz"), "--out", out])
    assert "fits complex GRE data" in line and "is real (float32)" in line
    # volumes do not match flip angles x echo times
    line = _error(capsys, [*base, "--tr", "45", "--data", str(d / "short.nii.gz"), "--out", out])
    assert "has 40 measurements" in line and "5 flip angles x 10 echo times = 50" in line
    # a surrogate trained for another TR: the model's message
    line = _error(capsys, [*base, "--tr", "30", "--data", gre, "--surrogate", sur, "--out", out])
    assert "surrogate was trained for tr = 45.0, but this protocol has tr = 30.0" in line
    # missing --tr
    line = _error(capsys, [*base, "--data", gre, "--out", out])
    assert "needs --tr (repetition time in ms)" in line
    # --fix of a parameter the model does not have
    line = _error(capsys, [*base, "--tr", "45", "--data", gre, "--fix", "T9=1", "--out", out])
    assert "cannot fix ['T9']" in line
    # --surrogate on a model that has none
    line = _error(capsys, ["fit", "t2star", "--te", "3,6", "--data", gre, "--surrogate", sur,
                           "--out", out])  # fmt: skip
    assert "does not use --surrogate" in line
    # phase not in radians
    save_nifti(tmp_path / "ph.nii.gz", np.full(SHAPE + (50,), 4000.0, np.float32))
    line = _error(capsys, [*base, "--tr", "45", "--data", str(d / "real.nii.gz"), "--phase",
                           str(tmp_path / "ph.nii.gz"), "--out", out])  # fmt: skip
    assert "--phase must be in radians" in line
    # a protocol naming a surrogate file that is not there
    (tmp_path / "p.yaml").write_text("model: mcr-mwi\ntr: 45\nsurrogate: nothere.safetensors\n")
    line = _error(capsys, [*base, "--data", gre, "--protocol", str(tmp_path / "p.yaml"),
                           "--out", out])  # fmt: skip
    assert "surrogate file nothere.safetensors not found" in line
    assert not (tmp_path / "o").exists()
