"""``qmrkit batch --scheduler inprocess`` (no Dask): the command line, errors, voxel blocks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from qmrkit import cli
from qmrkit.io.bids import check_derivatives
from qmrkit.sim.bids import bids_dataset


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    truth = bids_dataset(root, n_subjects=2, shape=(8, 8), models=("molli", "vfa", "dti"))
    return root, truth


def test_cli_batch_vfa_in_process(study, capsys):
    root, truth = study
    out = root / "derivatives" / "vfa"
    rc = cli.main(
        ["batch", str(root), "--model", "vfa", "--scheduler", "inprocess", "--out", str(out), "-q"]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "3 done, 0 skipped (done before), 0 failed" in text
    assert check_derivatives(out) == []
    # Rician SNR 60 and 4 flip angles: VFA T1 within 5 % of the truth (median over tissue); the
    # published T1map is in s as BIDS defines it, the truth in qmrkit's ms
    for label, folder in (("sub-01", "sub-01/anat"), ("sub-02_ses-pre", "sub-02/ses-pre/anat")):
        t1 = np.asarray(nib.load(str(out / folder / f"{label}_T1map.nii.gz")).dataobj)
        want = truth[f"{label}/vfa"]["T1"] / 1000.0
        tissue = truth[f"{label}/vfa"]["M0"] > 500
        assert np.median(np.abs(t1[tissue] - want[tissue]) / want[tissue]) < 0.05
    side = json.loads((out / "sub-01/anat/sub-01_T1map.json").read_text())
    assert side["Units"] == "s"
    # the acquisition record stays in qmrkit's units (ms), as the fit used them
    assert side["Acquisition"] == {"flip_angles": [3.0, 8.0, 15.0, 20.0], "tr": 15.0}


def test_published_maps_are_qmrkit_fit_in_bids_units(study, tmp_path):
    """The published T1map is ``qmrkit fit``'s own T1map of the same input (run here, in this
    process) divided by 1000 in float32, bit for bit, with ``Units: "s"``; the M0map is the fit's
    unchanged (``"arbitrary"``), and the non-BIDS maps keep qmrkit's values and units."""
    from qmrkit.dist import run_batch
    from qmrkit.sim.bids import VFA_FLIPS, VFA_TR

    root, _ = study
    out = tmp_path / "deriv"
    rep = run_batch(root, "vfa", out=out, scheduler="inprocess", participant_label=["01"])
    assert [r.status for r in rep.records] == ["done"]
    # the same input as qmrkit fit takes it: the flip- collection stacked in FlipAngle order
    anat = root / "sub-01" / "anat"
    imgs = [nib.load(str(anat / f"sub-01_flip-{i}_VFA.nii.gz")) for i in (1, 2, 3, 4)]
    stacked = tmp_path / "sub-01_VFA.nii.gz"
    data = np.stack([np.asarray(i.dataobj) for i in imgs], axis=-1)
    nib.save(nib.Nifti1Image(data, imgs[0].affine, header=imgs[0].header), str(stacked))
    ref = tmp_path / "fit"
    fa = ",".join(repr(float(a)) for a in VFA_FLIPS)
    argv = ["fit", "vfa", "--data", str(stacked), "--fa", fa, "--tr", repr(float(VFA_TR))]
    assert cli.main([*argv, "--out", str(ref), "--no-figure", "-q"]) == 0

    def load(path):
        img = nib.load(str(path))
        meta = json.loads(path.with_name(path.name[: -len(".nii.gz")] + ".json").read_text())
        return np.asarray(img.dataobj), img.affine, meta

    pub = out / "sub-01" / "anat"
    t1, t1_affine, t1_side = load(pub / "sub-01_T1map.nii.gz")
    t1_ms, ref_affine, ref_side = load(ref / "T1map.nii.gz")
    assert ref_side["Units"] == "ms" and t1_side["Units"] == "s"
    assert t1.dtype == t1_ms.dtype == np.float32
    assert np.isfinite(t1).sum() > 20  # a real map (background NaN by the auto mask)
    np.testing.assert_array_equal(t1, t1_ms / np.float32(1000))
    np.testing.assert_array_equal(t1_affine, ref_affine)
    for stem, unit in (("M0map", "arbitrary"), ("residual", "a.u."), ("converged", "")):
        got, _, side = load(pub / f"sub-01_{stem}.nii.gz")
        want, _, ref_meta = load(ref / f"{stem}.nii.gz")
        np.testing.assert_array_equal(got, want)
        assert side["Units"] == unit, (stem, side["Units"], ref_meta["Units"])


def test_rerun_redoes_a_subject_published_in_ms(study, tmp_path):
    """A derivatives tree whose T1map still says ms (written before the BIDS units) is refitted by
    a rerun, not skipped, so one folder never mixes ms and s under the T1map suffix."""
    from qmrkit.dist import run_batch

    root, _ = study
    out = tmp_path / "deriv"
    kw = {"out": out, "scheduler": "inprocess", "participant_label": ["01"], "progress": False}
    assert [r.status for r in run_batch(root, "vfa", **kw).records] == ["done"]
    assert [r.status for r in run_batch(root, "vfa", **kw).records] == ["skipped"]
    side = out / "sub-01/anat/sub-01_T1map.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "Units": "ms"}))
    assert check_derivatives(out) == [
        "sub-01_T1map.json: Units is 'ms', but BIDS defines T1map in 's'"
    ]
    assert [r.status for r in run_batch(root, "vfa", **kw).records] == ["done"]
    assert json.loads(side.read_text())["Units"] == "s"
    assert check_derivatives(out) == []


def test_batch_dti_from_dwi_folder(study):
    """dwi/ inputs with .bval/.bvec: FA and MD against the simulated tensors (eigenvalues
    1.7, 0.3, 0.3 µm²/ms in one half of the image, isotropic 0.8 in the other)."""
    from qmrkit.dist import run_batch

    root, truth = study
    out = root / "derivatives" / "dti"
    rep = run_batch(root, "dti", out=out, scheduler="inprocess", participant_label=["01"])
    assert [r.status for r in rep.records] == ["done"]
    assert check_derivatives(out) == []
    name = "sub-01/dwi/sub-01_model-dti_param-{}_dwimap.nii.gz"
    fa = np.asarray(nib.load(str(out / name.format("FA"))).dataobj)
    md = np.asarray(nib.load(str(out / name.format("MD"))).dataobj)
    ev = np.array([1.7, 0.3, 0.3])
    fa_true = np.sqrt(1.5 * np.sum((ev - ev.mean()) ** 2) / np.sum(ev**2))  # 0.799
    prolate, iso = np.s_[4:, :, 0], np.s_[:4, :, 0]
    assert abs(np.median(fa[prolate]) - fa_true) < 0.05
    assert abs(np.median(md[prolate]) - ev.mean()) < 0.05
    assert abs(np.median(md[iso]) - 0.8) < 0.05 and np.median(fa[iso]) < 0.1
    side = json.loads((out / name.format("FA").replace(".nii.gz", ".json")).read_text())
    assert "bids:raw:sub-01/dwi/sub-01_dwi.bval" in side["Sources"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scheduler", "nowhere"], "--scheduler must be 'local', 'inprocess' or a scheduler"),
        (["--participant-label", "42"], "participant(s) 42 not in"),
        (["--block-voxels", "0"], "must be > 0, got 0"),
    ],
)
def test_cli_batch_usage_errors(study, capsys, argv, message):
    root, _ = study
    rc = cli.main(["batch", str(root), "--model", "molli", "--scheduler", "inprocess", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_no_inputs_for_the_model(study, capsys):
    root, _ = study
    rc = cli.main(["batch", str(root), "--model", "t2", "--scheduler", "inprocess"])
    assert rc == 2
    assert "no inputs for model 't2'" in capsys.readouterr().err


def test_dwi_timing_is_inherited_into_the_fit_flags(study, tmp_path):
    """δ/Δ from a top-level dwi.json reach ``qmrkit fit --json`` merged with the subject's own
    sidecar (the inheritance principle), in seconds as BIDS writes them."""
    from qmrkit.dist.batch import Job, _fit_argv
    from qmrkit.io.bids import BidsDataset, find_inputs

    root, _ = study
    top = root / "dwi.json"
    top.write_text(json.dumps({"SmallDelta": 0.0135, "BigDelta": 0.03, "EchoTime": 0.1}))
    try:
        item = find_inputs(BidsDataset(root), "dti", participant_label=["01"])[0]
    finally:
        top.unlink()
    assert item.dwi["metadata"] == {"SmallDelta": 0.0135, "BigDelta": 0.03, "EchoTime": 0.08}
    assert item.sources[-2:] == ["bids:raw:dwi.json", "bids:raw:sub-01/dwi/sub-01_dwi.json"]
    argv = _fit_argv(Job(item, "nexi", tmp_path, tmp_path), tmp_path, tmp_path / "fit")
    side = argv[argv.index("--json") + 1]
    assert json.loads(open(side).read()) == {"SmallDelta": 0.0135, "BigDelta": 0.03}
    assert argv[:3] == ["nexi", "--dwi", str(item.files[0])]


def test_voxel_blocks_keep_the_whole_volume_auto_mask(study, tmp_path):
    """Blocks fit only the voxels the whole-volume auto mask keeps: background stays NaN exactly
    where an unblocked fit leaves it NaN, tissue values agree to lm's tolerance, and the sidecar
    records the whole volume's mask (not a block's)."""
    from qmrkit.dist import run_batch

    root, truth = study
    kw = {"participant_label": ["01"], "progress": False, "scheduler": "inprocess"}
    whole = run_batch(root, "molli", out=tmp_path / "whole", **kw)
    blocked = run_batch(root, "molli", out=tmp_path / "blocks", block_voxels=20, **kw)
    assert [r.blocks for r in whole.records] == [1] and [r.blocks for r in blocked.records] == [4]
    name = "sub-01/anat/sub-01_T1map"
    a = np.asarray(nib.load(str(tmp_path / "whole" / f"{name}.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "blocks" / f"{name}.nii.gz")).dataobj)
    side_a = json.loads((tmp_path / "whole" / f"{name}.json").read_text())
    side_b = json.loads((tmp_path / "blocks" / f"{name}.json").read_text())
    assert side_a["Mask"]["Method"] == "auto" and side_a["Mask"]["BackgroundFound"]
    assert side_b["Mask"] == side_a["Mask"]
    # 4 blocks of ≤ 20 voxels; the last (voxels 60-63) is all background and is not fitted
    assert side_b["VoxelBlocks"] == 4
    assert 0 < np.isnan(a).sum() == np.isnan(b).sum()
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    np.testing.assert_allclose(b[ok], a[ok], rtol=1e-3)
