"""``qmrkit batch`` on a 2-worker LocalCluster over a synthetic 6-subject BIDS dataset.

One batch run (module fixture) serves several tests: a worker is killed while it fits a subject,
one extra subject has a corrupt file. The maps are compared with ``qmrkit fit`` run in this
process on the same inputs (bit for bit; the T1map in BIDS seconds = the fit's ms / 1000), with
the phantoms' known T1, and the tree with the BIDS-derivatives rules (and the BIDS validator when
one is installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmrkit import cli
from qmrkit.io.bids import check_derivatives
from qmrkit.sim.bids import bids_dataset

pytest.importorskip("distributed", reason="dask.distributed is the optional 'batch' extra")

pytestmark = pytest.mark.slow  # starts Dask clusters and fits 7 inputs (~1 min on 2 cores)

SHAPE = (12, 12)
GOOD = ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-06_ses-post", "sub-06_ses-pre"]
MAPS = ("T1map", "T1starmap", "Amap", "Bmap", "residual", "converged")


def _killer(client, killed: dict) -> None:
    """Kill (os._exit) the first worker seen fitting a subject, a moment into its fit."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            busy = {w: ks for w, ks in client.processing().items() if ks}
            if busy:
                worker, keys = sorted(busy.items())[0]
                time.sleep(0.3)  # into the fit, before it is written
                killed["worker"], killed["keys"] = worker, list(keys)
                # the call cannot get an answer from a process that exits: its error is expected
                with contextlib.suppress(Exception):
                    client.run(os._exit, 1, workers=[worker])
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    killed["thread"] = t


@pytest.fixture(scope="module")
def client():
    """One 2-worker LocalCluster for the module (as ``run_batch(scheduler="local")`` makes)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def batch(tmp_path_factory, client):
    from qmrkit.dist import run_batch

    root = tmp_path_factory.mktemp("study")
    truth = bids_dataset(root, n_subjects=6, shape=SHAPE)
    bad = root / "sub-07" / "anat"
    bad.mkdir(parents=True)
    (bad / "sub-07_MOLLI.nii.gz").write_bytes(b"\x1f\x8b not really a gzip NIfTI")
    killed: dict = {}
    report = run_batch(
        root,
        "molli",
        scheduler=client,
        progress=False,
        on_start=lambda client: _killer(client, killed),
    )
    killed["thread"].join()
    return root, truth, report, killed


def test_every_good_subject_done_bad_one_reported(batch):
    root, _, report, _ = batch
    status = {r.label: r.status for r in report.records}
    assert status == {**dict.fromkeys(GOOD, "done"), "sub-07": "failed"}
    bad = next(r for r in report.records if r.label == "sub-07")
    assert "sub-07_MOLLI.nii.gz" in bad.message and "DataFileError" in bad.message
    assert "7 done, 0 skipped (done before), 1 failed" in report.table()
    out = root / "derivatives" / "qmrkit"
    assert not (out / "logs" / "sub-07_molli.json").exists()  # no record: a rerun tries again
    assert not (out / ".qmrkit-tmp").exists()  # temporary folders removed


def test_killed_worker_still_every_output(batch):
    root, _, report, killed = batch
    assert "worker" in killed, "no worker was seen busy, nothing was killed"
    out = root / "derivatives" / "qmrkit"
    for label in GOOD:
        sub, _, ses = label.partition("_")
        folder = out / sub / ses / "anat"
        for stem in MAPS:
            assert (folder / f"{label}_{stem}.nii.gz").exists()
            assert (folder / f"{label}_{stem}.json").exists()
    # the tasks the dead worker held were finished by a live one
    workers = {r.label: r.worker for r in report.records if r.status == "done"}
    assert killed["worker"] not in workers.values()


def test_derivatives_tree_is_valid(batch):
    root, _, _, _ = batch
    out = root / "derivatives" / "qmrkit"
    assert check_derivatives(out) == []
    side = json.loads((out / "sub-02" / "anat" / "sub-02_T1map.json").read_text())
    assert side["Units"] == "s" and side["Model"] == "molli" and side["Solver"] == "lm"
    assert side["Sources"][0] == "bids:raw:sub-02/anat/sub-02_inv-1_MOLLI.nii.gz" or all(
        s.startswith("bids:raw:sub-02/anat/") or s == "bids:raw:MOLLI.json" for s in side["Sources"]
    )
    assert len([s for s in side["Sources"] if s.endswith(".nii.gz")]) == 8
    validator = shutil.which("bids-validator") or os.environ.get("QMRKIT_BIDS_VALIDATOR")
    if validator is None:
        pytest.skip("bids-validator (node) not installed: checked by the rules above only")
    run = subprocess.run(
        [validator, "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    issues = json.loads(run.stdout)["issues"]
    assert issues["errors"] == [], issues["errors"]


def _reference_fit(root: Path, label: str, tmp: Path, truth: dict) -> Path:
    """``qmrkit fit molli`` in this process on the subject's series (a 4D file as stored, or the
    inv- collection stacked here in TI order)."""
    sub, _, ses = label.partition("_")
    anat = root / sub / ses / "anat"
    four_d = anat / f"{label}_MOLLI.nii.gz"
    if not four_d.exists():
        files = sorted(anat.glob(f"{label}_inv-*_MOLLI.nii.gz"))
        tis = [
            json.loads(f.with_name(f.name[:-7] + ".json").read_text())["InversionTime"]
            for f in files
        ]
        imgs = [nib.load(str(files[i])) for i in np.argsort(tis)]
        data = np.stack([np.asarray(i.dataobj) for i in imgs], axis=-1)
        four_d = tmp / f"{label}_stacked.nii.gz"
        nib.save(nib.Nifti1Image(data, imgs[0].affine, header=imgs[0].header), str(four_d))
    ti = ",".join(repr(float(t)) for t in truth[label]["ti"])
    out = tmp / label
    rc = cli.main(
        ["fit", "molli", "--data", str(four_d), "--ti", ti, "--out", str(out), "--no-figure", "-q"]
    )
    assert rc == 0
    return out


def test_maps_equal_single_process_fit_bit_for_bit(batch, tmp_path):
    root, truth, _, _ = batch
    out = root / "derivatives" / "qmrkit"
    for label in ("sub-02", "sub-03", "sub-06_ses-pre"):  # collection, own sidecar, session
        ref = _reference_fit(root, label, tmp_path, truth)
        sub, _, ses = label.partition("_")
        for stem in MAPS:
            got = nib.load(str(out / sub / ses / "anat" / f"{label}_{stem}.nii.gz"))
            want = nib.load(str(ref / f"{stem}.nii.gz"))
            want_arr = np.asarray(want.dataobj)
            if stem == "T1map":  # BIDS defines T1map in s: qmrkit fit's ms / 1000 in float32
                want_arr = want_arr / np.float32(1000)
            np.testing.assert_array_equal(np.asarray(got.dataobj), want_arr)
            np.testing.assert_array_equal(got.affine, want.affine)
        # and the fit is right: T1 of the tissue voxels against the phantom's truth (ms -> s)
        t1 = np.asarray(nib.load(str(out / sub / ses / "anat" / f"{label}_T1map.nii.gz")).dataobj)
        tissue = truth[label]["M0"] > 500
        t1_true = truth[label]["T1"][tissue] / 1000.0
        rel = np.abs(t1[tissue] - t1_true) / t1_true
        assert np.median(rel) < 0.03


def test_rerun_resumes_and_reports_failure(batch, capsys):
    root, _, _, _ = batch
    out = root / "derivatives" / "qmrkit"
    t1 = out / "sub-01" / "anat" / "sub-01_T1map.nii.gz"
    before = t1.stat().st_mtime_ns
    # a killed run leaves a subject without its record: it is redone, the others skipped
    (out / "logs" / "sub-05_molli.json").unlink()
    rc = cli.main(["batch", str(root), "--model", "molli", "--scheduler", "inprocess", "-q"])
    text = capsys.readouterr().out
    assert rc == 1  # sub-07 still fails
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines()[1:-2]}
    assert rows == {
        **dict.fromkeys(GOOD, "skipped"),
        "sub-05": "done",
        "sub-07": "failed",
    }
    assert t1.stat().st_mtime_ns == before  # skipped subjects' files are not rewritten


def test_voxel_blocks_on_the_cluster(batch, client, tmp_path):
    """One subject in 3 voxel blocks (3 tasks + a merge task): the same maps as the blocks fitted
    one after the other in this process (bit for bit), and the whole-volume fit to the solver's
    tolerance where it converged."""
    from qmrkit.dist import run_batch

    root, truth, _, _ = batch
    kw = {"participant_label": ["01"], "block_voxels": 50, "progress": False}
    on_cluster = run_batch(root, "molli", out=tmp_path / "a", scheduler=client, **kw)
    here = run_batch(root, "molli", out=tmp_path / "b", scheduler="inprocess", **kw)
    assert [r.blocks for r in on_cluster.records] == [3] == [r.blocks for r in here.records]
    whole = root / "derivatives" / "qmrkit" / "sub-01" / "anat"
    conv = np.asarray(nib.load(str(whole / "sub-01_converged.nii.gz")).dataobj) == 1
    for stem in MAPS:
        a = np.asarray(nib.load(str(tmp_path / "a/sub-01/anat" / f"sub-01_{stem}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "b/sub-01/anat" / f"sub-01_{stem}.nii.gz")).dataobj)
        np.testing.assert_array_equal(a, b)
    side = json.loads((tmp_path / "a/sub-01/anat/sub-01_T1map.json").read_text())
    assert side["VoxelBlocks"] == 3
    t1_blocks = np.asarray(nib.load(str(tmp_path / "a/sub-01/anat/sub-01_T1map.nii.gz")).dataobj)
    t1_whole = np.asarray(nib.load(str(whole / "sub-01_T1map.nii.gz")).dataobj)
    tissue = conv & (truth["sub-01"]["M0"] > 500)
    # lm stops a voxel when its cost changes by < ftol = 1e-6 (float32) relatively, which fixes
    # a parameter to about sqrt(ftol) = 1e-3 relative; blocks differ only in the data scale
    np.testing.assert_allclose(t1_blocks[tissue], t1_whole[tissue], rtol=1e-3)
