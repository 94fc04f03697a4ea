"""BIDS index (entities, inheritance, inputs per model) and the derivatives rules."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from qmrkit.errors import DataFileError, ParameterError
from qmrkit.io.bids import (
    BidsDataset,
    build_name,
    check_derivatives,
    derivative_name,
    find_inputs,
    parse_name,
    to_bids_units,
    write_dataset_description,
)
from qmrkit.sim.bids import OTHER_TI, VFA_FLIPS, VFA_TR, bids_dataset
from qmrkit.sim.relaxometry import MOLLI_TI


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    truth = bids_dataset(root, n_subjects=4, shape=(8, 8), models=("molli", "vfa", "dti"))
    return root, truth


def test_parse_and_build_names():
    ents, suffix, ext = parse_name("sub-01_ses-pre_acq-fast_inv-2_MOLLI.nii.gz")
    assert ents == {"sub": "01", "ses": "pre", "acq": "fast", "inv": "2"}
    assert (suffix, ext) == ("MOLLI", ".nii.gz")
    # entities come back in the specification's order whatever order they are given in
    assert build_name({"run": "1", "acq": "x", "sub": "01"}, "T1map", ".json") == (
        "sub-01_acq-x_run-1_T1map.json"
    )
    with pytest.raises(ParameterError, match="not a BIDS file name"):
        parse_name("sub01_T1w.nii.gz")
    with pytest.raises(ParameterError, match="repeats the entity 'sub'"):
        parse_name("sub-01_sub-02_T1w.nii.gz")


def test_molli_inputs_inheritance_and_units(raw):
    root, truth = raw
    ds = BidsDataset(root)
    assert ds.subjects() == ["01", "02", "03", "04"]
    items = {i.label: i for i in find_inputs(ds, "molli")}
    assert sorted(items) == ["sub-01", "sub-02", "sub-03", "sub-04_ses-post", "sub-04_ses-pre"]
    # sub-01: 4D series, InversionTime list inherited from the top-level MOLLI.json (s -> ms)
    assert items["sub-01"].settings["ti"] == pytest.approx(list(MOLLI_TI), abs=1e-9)
    assert items["sub-01"].sources == [
        "bids:raw:sub-01/anat/sub-01_MOLLI.nii.gz",
        "bids:raw:MOLLI.json",
    ]
    # sub-03: its own sidecar overrides the top-level list
    assert items["sub-03"].settings["ti"] == pytest.approx(list(OTHER_TI), abs=1e-9)
    assert "bids:raw:sub-03/anat/sub-03_MOLLI.json" in items["sub-03"].sources
    # sub-02: a shuffled inv- collection comes back in inversion-time order, each file's scalar
    # InversionTime overriding the inherited list
    two = items["sub-02"]
    assert two.settings["ti"] == pytest.approx(list(MOLLI_TI), abs=1e-9)
    stacked = np.stack([np.asarray(nib.load(str(f)).dataobj) for f in two.files], axis=-1)
    np.testing.assert_array_equal(stacked, truth["sub-02"]["series"].astype(np.float32))
    assert items["sub-04_ses-pre"].session == "pre"


def test_vfa_and_dwi_inputs(raw):
    root, _ = raw
    ds = BidsDataset(root)
    vfa = find_inputs(ds, "vfa", participant_label=["sub-02"])
    assert [i.label for i in vfa] == ["sub-02"]
    assert vfa[0].settings == {"flip_angles": list(VFA_FLIPS), "tr": pytest.approx(VFA_TR)}
    dwi = find_inputs(ds, "dti", participant_label=["01"])
    assert dwi[0].datatype == "dwi"
    assert dwi[0].dwi["bval"].name == "sub-01_dwi.bval"
    assert dwi[0].dwi["metadata"] == {"EchoTime": 0.08}
    with pytest.raises(ParameterError, match="participant.*09 not in"):
        find_inputs(ds, "molli", participant_label=["09"])


def test_input_problems_are_per_subject(tmp_path):
    bids_dataset(tmp_path, n_subjects=3, shape=(8, 8))
    # sub-01: a 4D series whose inherited list has the wrong length
    (tmp_path / "sub-01" / "anat" / "sub-01_MOLLI.json").write_text(
        json.dumps({"InversionTime": [0.1, 0.2]})
    )
    # sub-02: a collection file with InversionTime in ms
    side = tmp_path / "sub-02" / "anat" / "sub-02_inv-1_MOLLI.json"
    side.write_text(json.dumps({"InversionTime": 180}))
    items = {i.label: i for i in find_inputs(BidsDataset(tmp_path), "molli")}
    assert "InversionTime as a list of 8 values" in items["sub-01"].error
    assert "looks like milliseconds" in items["sub-02"].error


def test_two_sidecars_at_one_level_is_an_error(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nib.save(
        nib.Nifti1Image(np.zeros((2, 2, 1, 8), np.float32), np.eye(4)),
        anat / "sub-01_acq-x_MOLLI.nii.gz",
    )
    # both apply to sub-01_acq-x_MOLLI with one entity each, in one folder: ambiguous
    (tmp_path / "acq-x_MOLLI.json").write_text(json.dumps({"InversionTime": [0.1] * 8}))
    (tmp_path / "sub-01_MOLLI.json").write_text(json.dumps({"InversionTime": [0.2] * 8}))
    ds = BidsDataset(tmp_path)
    with pytest.raises(DataFileError, match="at the same level"):
        ds.metadata(ds.get(suffix="MOLLI")[0])
    # one of them deeper (nearer the data) is the ordinary override
    (tmp_path / "sub-01_MOLLI.json").rename(anat / "sub-01_MOLLI.json")
    ds = BidsDataset(tmp_path)
    assert ds.metadata(ds.get(suffix="MOLLI")[0])["InversionTime"] == [0.2] * 8


def test_derivative_names_and_rules(raw, tmp_path):
    root, _ = raw
    ds = BidsDataset(root)
    item = {i.label: i for i in find_inputs(ds, "molli")}["sub-04_ses-pre"]
    assert derivative_name(item, "T1map", ".nii.gz", "molli") == (
        "sub-04/ses-pre/anat",
        "sub-04_ses-pre_T1map.nii.gz",
    )
    dwi = find_inputs(ds, "dti", participant_label=["01"])[0]
    assert derivative_name(dwi, "FAmap", ".json", "dti") == (
        "sub-01/dwi",
        "sub-01_model-dti_param-FA_dwimap.json",
    )
    out = tmp_path / "deriv"
    write_dataset_description(out, ds, model="molli", solver="lm")
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "qmrkit"
    readme = (out / "README").read_text()
    assert "T1map, T2map, T2starmap in s" in readme and "times in ms" in readme
    # the README qmrkit wrote while maps were in ms is replaced; a user's own README is kept
    (out / "README").write_text(
        "Parametric maps of x written by qmrkit 0.1. Times are in ms (each "
        "sidecar's Units says so); logs/ holds one JSON record.\n"
    )
    write_dataset_description(out, ds, model="molli", solver="lm")
    assert (out / "README").read_text() == readme
    (out / "README").write_text("My study's maps.\n")
    write_dataset_description(out, ds, model="molli", solver="lm")
    assert (out / "README").read_text() == "My study's maps.\n"
    assert check_derivatives(out) == []
    # each rule catches its violation
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nib.save(
        nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), anat / "sub-01_T1map.nii.gz"
    )
    (anat / "sub-01_T1map.json").write_text(json.dumps({"Units": "ms"}))
    (anat / "run-1_sub-01_T2map.json").write_text("{}")
    (anat / "sub-01_Foo.json").write_text("{}")
    problems = "\n".join(check_derivatives(out))
    assert "sub-01_T1map.json: lacks Sources" in problems
    assert "sub-01_T1map.json: Units is 'ms', but BIDS defines T1map in 's'" in problems
    assert "run-1_sub-01_T2map.json: name does not start with its folders' entities" in problems
    assert "suffix 'Foo' is not a BIDS map and not in .bidsignore" in problems


def test_to_bids_units_converts_bids_time_maps_only(tmp_path):
    """BIDS defines T1map/T2map/T2starmap in s and the rates in 1/s (bids-specification
    src/schema/objects/suffixes.yaml): qmrkit's ms maps are divided by 1000 in float32 (the
    correctly rounded quotient, NaN kept, geometry kept); rates in 1/s and non-BIDS maps are left
    byte for byte; a unit with no conversion is an error, not a guess."""
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    ms = np.array([[[1200.0], [np.nan]], [[45.3], [0.7]]], np.float32)  # (2, 2, 1)

    def write(name: str, data: np.ndarray) -> object:
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        nib.save(img, tmp_path / name)
        return tmp_path / name

    t1 = write("sub-01_T1map.nii.gz", ms)
    meta = to_bids_units(t1, {"Units": "ms", "Description": "T1"})
    assert meta == {"Units": "s", "Description": "T1"}
    got = nib.load(t1)
    arr = np.asarray(got.dataobj)
    assert arr.dtype == np.float32
    # the float64 quotient rounded once to float32 (exact: 53 >= 2*24 + 2 bits), NaN kept
    want = (ms.astype(np.float64) / 1000.0).astype(np.float32)
    np.testing.assert_array_equal(arr, want)
    assert arr[0, 0, 0] == np.float32(1.2) and np.isnan(arr[0, 1, 0])
    np.testing.assert_array_equal(got.affine, affine)
    assert int(got.header["sform_code"]) == 1 and int(got.header["qform_code"]) == 1
    assert got.header["descrip"].tobytes().rstrip(b"\0") == b"qmrkit T1map [s]"

    # a rate already in 1/s, and a non-BIDS time map: Units kept, files not rewritten
    for name, unit, bids_unit in (
        ("sub-01_R2starmap.nii.gz", "1/s", "1/s"),
        ("sub-01_T1starmap.nii.gz", "ms", "ms"),
        ("sub-01_model-dti_param-MD_dwimap.nii.gz", "um^2/ms", "um^2/ms"),
    ):
        f = write(name, ms)
        before = f.read_bytes()
        assert to_bids_units(f, {"Units": unit})["Units"] == bids_unit
        assert f.read_bytes() == before
    assert to_bids_units(write("sub-01_M0map.nii.gz", ms), {"Units": "a.u."}) == {
        "Units": "arbitrary"
    }
    t2 = write("sub-01_T2map.nii.gz", ms)
    with pytest.raises(DataFileError, match="BIDS T2map is in 's', but the map is in 'min'"):
        to_bids_units(t2, {"Units": "min"})
    with pytest.raises(DataFileError, match="its sidecar has no Units"):
        to_bids_units(t2, {})
