"""The qmrkit command line, end to end on files."""

import json
import subprocess
import sys

import numpy as np
import pytest

from qmrkit.cli import main
from qmrkit.io import load_nifti, save_nifti
from qmrkit.sim import MOLLI_TI, molli_series

TI_ARG = ",".join(str(t) for t in MOLLI_TI)


@pytest.fixture
def molli_files(tmp_path):
    t1 = np.linspace(400, 2000, 48).reshape(6, 8)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=200, seed=0)
    path = save_nifti(
        tmp_path / "series.nii.gz", series.astype(np.float32), affine=np.diag([2.0, 2.0, 8.0, 1.0])
    )
    return tmp_path, path, t1


def test_fit_writes_maps_figure_and_sidecar(molli_files, capsys):
    tmp, path, t1 = molli_files
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(path),
                "--ti",
                TI_ARG,
                "--out",
                str(tmp / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    est, affine = load_nifti(tmp / "out" / "T1map.nii.gz")
    assert np.median(np.abs(est - t1) / t1) < 0.01
    np.testing.assert_allclose(affine, np.diag([2.0, 2.0, 8.0, 1.0]))
    assert (tmp / "out" / "maps.png").stat().st_size > 10_000
    side = json.loads((tmp / "out" / "fit.json").read_text())
    assert side["Acquisition"]["ti"] == list(MOLLI_TI) and side["Solver"] == "lm"
    assert "voxels" in capsys.readouterr().out


def test_fit_with_protocol_mask_and_adam(molli_files):
    tmp, path, t1 = molli_files
    proto = tmp / "protocol.yaml"
    proto.write_text("model: molli\nti: [" + TI_ARG + "]\n")
    mask = np.ones(t1.shape, np.uint8)
    mask[0] = 0
    save_nifti(tmp / "mask.nii.gz", mask)
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(path),
                "--protocol",
                str(proto),
                "--mask",
                str(tmp / "mask.nii.gz"),
                "--solver",
                "adam",
                "--out",
                str(tmp / "o2"),
                "--no-figure",
            ]
        )
        == 0
    )
    est, _ = load_nifti(tmp / "o2" / "T1map.nii.gz")
    assert np.isnan(est[0]).all()
    assert np.median(np.abs(est[1:] - t1[1:]) / t1[1:]) < 0.01


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["fit", "nope", "--data", "x.nii", "--out", "o"],
            "unknown model 'nope'; available models",
        ),
        (["fit", "molli", "--data", "missing.nii.gz", "--ti", TI_ARG, "--out", "o"], "not found"),
    ],
)
def test_user_mistakes_give_one_line_errors(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_series_length_mismatch_from_cli(molli_files, capsys):
    tmp, path, _ = molli_files
    assert (
        main(["fit", "molli", "--data", str(path), "--ti", "100,200", "--out", str(tmp / "o")]) == 2
    )
    assert "8 measurements" in capsys.readouterr().err


def test_console_script_version_and_models():
    out = subprocess.run(
        [sys.executable, "-m", "qmrkit", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("qmrkit ")
    out = subprocess.run([sys.executable, "-m", "qmrkit", "models"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("molli", "vfa", "t2star", "T1star", "ms"):
        assert name in out.stdout
