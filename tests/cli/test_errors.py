"""Every user mistake on the command line: one stderr line ``qmrkit CMD: error: ...``, exit 2,
no traceback, and before any expensive work."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from qmrkit import cli, models
from qmrkit.cli import main
from qmrkit.io import save_nifti
from qmrkit.sim import MOLLI_TI, molli_series

TI = ",".join(str(t) for t in MOLLI_TI)


@pytest.fixture
def files(tmp_path):
    """A 6x8 MOLLI series, a VFA series, a good mask, a non-file, garbage and a raw scan."""
    t1 = np.linspace(400, 2000, 48).reshape(6, 8)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=200, seed=0)
    save_nifti(tmp_path / "molli.nii.gz", series.astype(np.float32))
    vfa = models.VfaT1([3, 8, 15, 20], 15.0).simulate({"M0": np.full(t1.shape, 3000.0), "T1": t1})
    save_nifti(tmp_path / "vfa.nii.gz", vfa.numpy().astype(np.float32))
    save_nifti(tmp_path / "mask_yx.nii.gz", np.ones((8, 6), np.uint8))  # (y, x): transposed
    save_nifti(tmp_path / "b1_yx.nii.gz", np.ones((8, 6), np.float32))
    save_nifti(tmp_path / "b1_small.nii.gz", np.ones((5, 5), np.float32))
    (tmp_path / "garbage.nii.gz").write_text("not a NIfTI file")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "proto.yaml").write_text("model: vfa\nflip_angles: [3, 15]\ntr: 15\n")
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qmrkit {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


CASES = [
    # (command line with {d} = the fixture folder, command, text the line must contain)
    (
        ["fit", "nope", "--data", "{d}/molli.nii.gz", "--out", "{d}/o"],
        "fit",
        "unknown model 'nope'",
    ),
    (
        ["fit", "molli", "--data", "{d}/missing.nii.gz", "--ti", TI, "--out", "{d}/o"],
        "fit",
        "file not found: ",
    ),
    (
        ["fit", "molli", "--data", "{d}/garbage.nii.gz", "--ti", TI, "--out", "{d}/o"],
        "fit",
        "cannot read NIfTI file",
    ),
    (
        ["fit", "molli", "--data", "{d}/molli.nii.gz", "--out", "{d}/o"],
        "fit",
        "needs --ti (inversion times in ms)",
    ),
    (
        ["fit", "vfa", "--data", "{d}/vfa.nii.gz", "--fa", "3,8,15,20", "--out", "{d}/o"],
        "fit",
        "needs --tr (repetition time in ms)",
    ),
    (
        ["fit", "vfa", "--data", "{d}/vfa.nii.gz", "--out", "{d}/o"],
        "fit",
        "needs --fa (flip angles in degrees); --tr",
    ),
    (["fit", "t2star", "--data", "{d}/molli.nii.gz", "--out", "{d}/o"], "fit", "needs --te"),
    (
        ["fit", "molli", "--data", "{d}/molli.nii.gz", "--ti", TI, "--te", "3,4", "--out", "{d}/o"],
        "fit",
        "does not use --te",
    ),
    (
        [
            "fit",
            "molli",
            "--data",
            "{d}/molli.nii.gz",
            "--ti",
            TI,
            "--b1",
            "{d}/b1_yx.nii.gz",
            "--out",
            "{d}/o",
        ],
        "fit",
        "does not use --b1",
    ),
    (
        ["fit", "molli", "--data", "{d}/molli.nii.gz", "--ti", "100,200", "--out", "{d}/o"],
        "fit",
        "8 measurements",
    ),
    (
        ["fit", "molli", "--data", "{d}/molli.nii.gz", "--ti", "100,x", "--out", "{d}/o"],
        "fit",
        "expected numbers separated by commas",
    ),
    (
        [
            "fit",
            "molli",
            "--data",
            "{d}/molli.nii.gz",
            "--ti",
            TI,
            "--mask",
            "{d}/mask_yx.nii.gz",
            "--out",
            "{d}/o",
        ],
        "fit",
        "--mask has shape (8, 6) but the series' images are (6, 8) (it looks like (y, x) order",
    ),
    (
        [
            "fit",
            "vfa",
            "--data",
            "{d}/vfa.nii.gz",
            "--fa",
            "3,8,15,20",
            "--tr",
            "15",
            "--b1",
            "{d}/b1_small.nii.gz",
            "--out",
            "{d}/o",
        ],
        "fit",
        "--b1 has shape (5, 5) but the series' images are (6, 8)",
    ),
    (
        [
            "fit",
            "molli",
            "--data",
            "{d}/molli.nii.gz",
            "--protocol",
            "{d}/proto.yaml",
            "--out",
            "{d}/o",
        ],
        "fit",
        "the protocol is for model 'vfa'",
    ),
    (
        ["fit", "molli", "--data", "{d}/molli.nii.gz", "--ti", TI, "--tv", "0.1", "--out", "{d}/o"],
        "fit",
        "--tv and --loss apply to --solver adam only",
    ),
    (
        [
            "fit",
            "molli",
            "--data",
            "{d}/molli.nii.gz",
            "--ti",
            TI,
            "--max-iter",
            "-3",
            "--out",
            "{d}/o",
        ],
        "fit",
        "argument --max-iter: must be > 0, got -3",
    ),
    (
        [
            "fit",
            "molli",
            "--data",
            "{d}/molli.nii.gz",
            "--ti",
            TI,
            "--device",
            "gpu",
            "--out",
            "{d}/o",
        ],
        "fit",
        "unknown device 'gpu'",
    ),
    (
        ["fit", "molli", "--data", "{d}/molli.nii.gz", "--ti", TI, "--out", "{d}/afile/sub"],
        "fit",
        "cannot create a folder there, ",
    ),
    (
        ["fit", "molli", "--data", "{d}/molli.nii.gz", "--ti", TI, "--out", "{d}/afile"],
        "fit",
        "exists and is not a folder",
    ),
    (  # a folder is read as a DICOM series; this one holds NIfTI files only
        ["fit", "molli", "--data", "{d}", "--ti", TI, "--out", "{d}/o"],
        "fit",
        "no DICOM images in ",
    ),
    (["fit", "molli", "--bogus"], "fit", "the following arguments are required"),
    (["recon", "{d}/missing.h5", "--out", "{d}/r"], "recon", "file not found"),
    (["recon", "{d}/garbage.nii.gz", "--out", "{d}/r"], "recon", "garbage.nii.gz"),
    (["mrf", "{d}/missing.h5", "--out", "{d}/m"], "mrf", "file not found"),
    (["send", "{d}/missing.h5", "--config", "null", "--out", "{d}/s"], "send", "file not found"),
    (
        ["send", "{d}/garbage.nii.gz", "--config", "null", "--out", "{d}/s"],
        "send",
        "is not an ISMRMRD HDF5 file",
    ),
    (["serve", "--port", "70000"], "serve", "must be >= 0 and <= 65535"),
    (["learn", "train", "--out", "{d}/l", "--epochs", "0"], "learn train", "must be > 0"),
]


@pytest.mark.parametrize("argv, command, text", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_mistake_is_one_line_and_exit_2(files, capsys, monkeypatch, argv, command, text):
    calls = []
    monkeypatch.setattr("qmrkit.fit.lm", lambda *a, **k: calls.append(1) or 1 / 0)
    rc = main([a.replace("{d}", str(files)) for a in argv])
    line = _one_error_line(capsys, command)
    assert rc == 2
    assert text in line, line
    assert not calls, "the mistake was found only after fitting started"
    assert not (files / "o").exists()  # nothing written, no empty output folder either


def test_wrong_b1_shape_fails_before_fitting(files, capsys, monkeypatch):
    """A transposed B1 map is refused right after loading; fit.lm is never reached."""
    calls = []
    monkeypatch.setattr("qmrkit.fit.lm", lambda *a, **k: calls.append(1))
    argv = ["fit", "vfa", "--data", f"{files}/vfa.nii.gz", "--fa", "3,8,15,20", "--tr", "15"]
    rc = main([*argv, "--b1", f"{files}/b1_yx.nii.gz", "--out", f"{files}/o"])
    assert rc == 2 and not calls
    assert "(it looks like (y, x) order" in _one_error_line(capsys, "fit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(files, capsys):
    from qmrkit.sim import raw_scan

    raw_scan((16, 16), n_coils=2, calib=8, path=files / "scan.h5")
    rc = main(["recon", f"{files}/scan.h5", "--device", "cuda", "--out", f"{files}/r"])
    line = _one_error_line(capsys, "recon")
    assert rc == 2 and "CUDA is not available" in line and "--device cpu" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(files, capsys):
    ro = files / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(
            [
                "fit",
                "molli",
                "--data",
                f"{files}/molli.nii.gz",
                "--ti",
                TI,
                "--out",
                str(ro / "maps"),
            ]
        )
    finally:
        ro.chmod(0o755)
    assert rc == 2 and "is not writable" in _one_error_line(capsys, "fit")


def test_no_arguments_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: qmrkit") and "fit" in err and "Traceback" not in err


def test_help_exits_0(capsys):
    assert main(["send", "--help"]) == 0
    assert "--config" in capsys.readouterr().out


def test_send_without_server(files, capsys):
    from qmrkit.io.mrd import write_mrd_images

    write_mrd_images(files / "imgs.h5", np.ones((2, 4, 4), np.float32))
    port = _free_port()
    argv = ["send", str(files / "imgs.h5"), "--config", "null", "--port", str(port)]
    rc = main([*argv, "--retries", "0", "--out", str(files / "s")])
    line = _one_error_line(capsys, "send")
    assert rc == 2
    assert f"cannot reach the server at 127.0.0.1:{port} after 1 attempt" in line
    assert "is 'qmrkit serve' running there?" in line
    # with retries, each retry is announced (one log line each) and the error is the last line
    rc = main([*argv, "--retries", "1", "--out", str(files / "s")])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 2
    assert "retrying in 1.0 s" in lines[0]
    assert (
        lines[1].startswith("qmrkit send: error: cannot reach the server")
        and "2 attempts" in lines[1]
    )


@pytest.mark.parametrize(
    "param, text",
    [
        ("ti=100,200", "is not valid JSON"),
        ("ti=[100,", "is not valid JSON"),
        ("novalue", "expected KEY=JSON"),
        ("=3", "expected KEY=JSON"),
    ],
)
def test_send_bad_param(files, capsys, param, text):
    from qmrkit.io.mrd import write_mrd_images

    write_mrd_images(files / "imgs.h5", np.ones((2, 4, 4), np.float32))
    argv = ["send", str(files / "imgs.h5"), "--config", "fit:molli", "--param", param]
    rc = main([*argv, "--port", str(_free_port()), "--retries", "0", "--out", str(files / "s")])
    assert rc == 2 and text in _one_error_line(capsys, "send")


def test_param_values():
    assert cli._parse_params(["ti=[100, 200]", "kind=T2star", "tr=15", 'name="a b"']) == {
        "ti": [100, 200],
        "kind": "T2star",
        "tr": 15,
        "name": "a b",
    }


def test_serve_on_busy_port(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = main(["serve", "--port", str(port)])
    line = _one_error_line(capsys, "serve")
    assert rc == 2 and f"cannot listen on 127.0.0.1 port {port}: Address already in use" in line


def test_radian_flip_angles_warn_in_one_line_and_run(files, capsys):
    argv = ["fit", "vfa", "--data", f"{files}/vfa.nii.gz", "--fa", "0.05,0.14,0.26,0.35"]
    rc = main([*argv, "--tr", "15", "--out", f"{files}/o", "--no-figure"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 0
    assert err == [
        "qmrkit fit: warning: flip_angles = [0.05, 0.14, 0.26, 0.35] look like radians; qmrkit "
        "expects degrees (e.g. [2.9, 8, 14.9, 20.1]); fitting as given"
    ]


def test_seconds_tis_warn(files, capsys):
    ti_s = ",".join(str(t / 1000) for t in MOLLI_TI)
    argv = ["fit", "molli", "--data", f"{files}/molli.nii.gz", "--ti", ti_s, "--no-figure"]
    assert main([*argv, "--out", f"{files}/o", "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("qmrkit fit: warning: ti = [0.1, 0.18")
    assert "look like seconds; qmrkit expects milliseconds" in err[0]


def test_models_name_the_cli_flags(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "needs --fa and --tr" in out and "needs --ti" in out and "flip_angles" not in out


def test_internal_errors_keep_their_traceback(monkeypatch):
    """A bug is not a user mistake: it propagates (traceback, exit status 1), never one line."""

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli._HANDLERS, "models", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["models"])


# -- diffusion models: qmrkit fit dti|nexi --dwi ... ----------------------------------------------
@pytest.fixture
def dwi_files(tmp_path):
    """A small DWI phantom (8x8, 2 shells at Δ = 20 ms, 8 directions, 2 b = 0) as users have it,
    and broken variants of its files."""
    from qmrkit.io import save_dwi
    from qmrkit.sim import dwi_phantom, dwi_protocol

    ph = dwi_phantom((8, 8), protocol=dwi_protocol(((20.0, (1.0, 2.5)),), n_dirs=8), snr=30)
    p = ph.save(tmp_path)
    n = ph.bvals.size
    d = tmp_path
    (d / "short.bval").write_text(" ".join(["0"] * (n - 1)) + "\n")
    (d / "negative.bval").write_text(p["bval"].read_text().replace("2500", "-2500"))
    long_g = ph.bvecs.copy()
    long_g[-1] *= 1.5
    save_dwi(d / "nonunit", ph.data, ph.bvals, long_g, affine=ph.affine, protocol=None)
    (d / "nob0.bval").write_text(" ".join(["1000"] * n) + "\n")
    (d / "nodelta.tsv").write_text("b\n" + "\n".join(str(b) for b in ph.bvals) + "\n")
    (d / "zerodelta.tsv").write_text(
        "b\tbig_delta\n" + "\n".join(f"{b}\t0" for b in ph.bvals) + "\n"
    )
    save_nifti(d / "mask_small.nii.gz", np.ones((8, 7, 1), np.uint8))
    save_nifti(d / "three_d.nii.gz", ph.data[:, :, :5].astype(np.float32))
    return d


_D = ["--dwi", "{d}/dwi.nii.gz", "--bval", "{d}/dwi.bval", "--bvec", "{d}/dwi.bvec"]


def _dti(dwi: str = "dwi.nii.gz", bval: str = "dwi.bval", bvec: str = "dwi.bvec") -> list[str]:
    files = ["--dwi", dwi, "--bval", bval, "--bvec", bvec]
    return ["fit", "dti", *(f if f.startswith("--") else "{d}/" + f for f in files)]


_P = ["--protocol", "{d}/dwi_protocol.tsv"]
DWI_CASES = [
    (["fit", "nexi", "--dwi", "{d}/dwi.nii.gz", "--bval", "{d}/dwi.bval", *_P], "needs --bvec"),
    (["fit", "dti", "--dwi", "{d}/dwi.nii.gz", "--bvec", "{d}/dwi.bvec"], "needs --bval"),
    (["fit", "dti", "--bval", "{d}/dwi.bval", "--bvec", "{d}/dwi.bvec"], "needs --dwi"),
    (_dti(bval="short.bval"), "has 18 volumes but there are 17 b-values and 18 b-vectors"),
    (["fit", "nexi", *_D], "needs the gradient separation Δ (ms) of every volume"),
    (["fit", "nexi", *_D, "--protocol", "{d}/nodelta.tsv"], "big_delta column (--protocol)"),
    (["fit", "nexi", *_D, "--protocol", "{d}/zerodelta.tsv"], "big_delta must be > 0 ms"),
    (["fit", "nexi", *_D, *_P, "--mask", "{d}/mask_small.nii.gz"], "--mask has shape (8, 7, 1)"),
    (["fit", "dti", *_D, "--data", "{d}/dwi.nii.gz"], "does not use --data"),
    (["fit", "dti", *_D, "--te", "10,20"], "it does not use --te"),
    (["fit", "molli", "--dwi", "{d}/dwi.nii.gz", "--ti", TI], "fits an image series (--data)"),
    (["fit", "molli", "--ti", TI], "model 'molli' needs --data"),
    (["fit", "molli", "--data", "{d}/dwi.nii.gz", "--ti", TI, "--solver", "mcmc"], "mcmc is"),
    (["fit", "nexi", *_D, *_P, "--tv", "fn:0.01"], "--tv and --loss apply to --solver adam only"),
    (["fit", "nexi", *_D, *_P, "--solver", "adam", "--tv", "fx:0.01"], "no parameter 'fx'"),
    (["fit", "nexi", *_D, *_P, "--solver", "adam", "--tv", "fn:-1"], "LAMBDA >= 0"),
    (["fit", "nexi", *_D, *_P, "--solver", "adam", "--tv-dims", "2"], "--tv-dims needs --tv"),
    (["fit", "nexi", *_D, *_P, "--mcmc-preset", "gacelle-mh"], "applies to --solver mcmc only"),
    (_dti(dwi="three_d.nii.gz"), "must be 4D (x, y, z, volumes)"),
    (_dti(bval="negative.bval"), "negative b-values"),
    (_dti(bval="nob0.bval"), "no b = 0 volume"),
    (
        _dti("nonunit/dwi.nii.gz", "nonunit/dwi.bval", "nonunit/dwi.bvec"),
        "diffusion-weighted volumes need unit vectors",
    ),
    (["fit", "nexi", *_D, "--protocol", "{d}/missing.tsv"], "file not found"),
]


@pytest.mark.parametrize("argv, text", DWI_CASES, ids=[c[1][:30] for c in DWI_CASES])
def test_diffusion_mistake_is_one_line_and_exit_2(dwi_files, capsys, monkeypatch, argv, text):
    calls = []
    for solver in ("lm", "adam", "mcmc", "dictionary_search"):
        monkeypatch.setattr(f"qmrkit.fit.{solver}", lambda *a, **k: calls.append(1) or 1 / 0)
    out = dwi_files / "o"
    rc = main([a.replace("{d}", str(dwi_files)) for a in [*argv, "--out", str(out)]])
    line = _one_error_line(capsys, "fit")
    assert rc == 2
    assert text in line, line
    assert not calls, "the mistake was found only after fitting started"
    assert not out.exists()
