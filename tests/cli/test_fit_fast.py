"""``qmrkit fit``: the automatic mask equals the in-process pipeline, ``--no-figure`` changes
nothing but the figure, per-stage timings in fit.json, and a start-up without unused imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qmrkit import pipelines, sim
from qmrkit.cli import main
from qmrkit.io import load_nifti, save_nifti

TI_ARG = ",".join(str(t) for t in sim.MOLLI_TI)
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast")
    ph = sim.cardiac_phantom((40, 32))
    series, _ = sim.molli_series(ph["T1"], 1000 * ph["PD"], sim.MOLLI_TI, snr=50)
    path = save_nifti(tmp / "series.nii.gz", series.astype(np.float32))
    return tmp, path, ph["labels"] > 0


def _fit(tmp: Path, path: Path, out: str, *extra: str) -> Path:
    argv = ["fit", "molli", "--data", str(path), "--ti", TI_ARG, "--out", str(tmp / out), "-q"]
    assert main([*argv, *extra]) == 0
    return tmp / out


def test_mask_auto_is_the_default_and_equals_the_pipeline(phantom_file):
    tmp, path, obj = phantom_file
    out = _fit(tmp, path, "auto", "--no-figure")
    data, _ = load_nifti(path)  # what the CLI fitted: float32 from the file
    ref = pipelines.fit_maps(data, "molli", {"ti": list(sim.MOLLI_TI)}, mask="auto")
    for name, stem in ref.map_names.items():
        got, _ = load_nifti(out / f"{stem}.nii.gz")
        np.testing.assert_array_equal(got, ref.maps[name].numpy().astype(np.float32))
    t1, _ = load_nifti(out / "T1map.nii.gz")
    assert np.isnan(t1[~obj]).all() and np.isfinite(t1[obj]).all()
    side = json.loads((out / "fit.json").read_text())
    assert side["Mask"]["Method"] == "auto" and side["Mask"]["VoxelCount"] == int(obj.sum())
    assert side["Mask"]["Threshold"] == pytest.approx(ref.settings["mask"]["Threshold"])
    assert side["VoxelsFitted"] == int(obj.sum())
    # every map's sidecar names the mask too
    assert json.loads((out / "T1map.json").read_text())["Mask"]["Method"] == "auto"


def test_mask_none_fits_every_voxel(phantom_file):
    tmp, path, obj = phantom_file
    out = _fit(tmp, path, "none", "--no-figure", "--mask", "none")
    side = json.loads((out / "fit.json").read_text())
    assert side["Mask"]["Method"] == "none" and side["VoxelsFitted"] == obj.size


def test_no_figure_writes_no_figure_and_the_same_maps(phantom_file):
    tmp, path, _ = phantom_file
    with_fig = _fit(tmp, path, "fig")
    without = _fit(tmp, path, "nofig", "--no-figure")
    png = with_fig / "maps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not (without / "maps.png").exists()
    stems = sorted(p.name for p in with_fig.glob("*.nii.gz"))
    assert stems == sorted(p.name for p in without.glob("*.nii.gz")) and len(stems) == 6
    for name in stems:
        a, _ = load_nifti(with_fig / name)
        b, _ = load_nifti(without / name)
        np.testing.assert_array_equal(a, b)
    timings = json.loads((with_fig / "fit.json").read_text())["Timings"]
    assert "figure_s" in timings
    assert "figure_s" not in json.loads((without / "fit.json").read_text())["Timings"]


def test_timings_in_fit_json_and_printed(phantom_file, capsys):
    tmp, path, _ = phantom_file
    argv = ["fit", "molli", "--data", str(path), "--ti", TI_ARG, "--out", str(tmp / "t")]
    assert main([*argv, "--no-figure", "--timings", "--no-progress"]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("timings:")]
    assert len(line) == 1
    t = json.loads((tmp / "t" / "fit.json").read_text())["Timings"]
    stages = ["import_s", "read_s", "mask_s", "fit_s", "write_s"]
    assert all(k in t and t[k] >= 0 for k in stages)
    # the total is the sum of the stages (startup included where the platform reports it)
    parts = sum(v for k, v in t.items() if k != "total_s")
    assert t["total_s"] == pytest.approx(parts, abs=0.01)
    assert t["fit_s"] > 0 and line[0].endswith(f"total {t['total_s']:.2f} s")


def test_figure_worker_failure_is_reported(tmp_path):
    from qmrkit._figure import FigureWorker

    w = FigureWorker()
    w.submit(tmp_path / "f.png", {"T1": np.ones((4, 4))}, units={"T1": "ms"}, bogus=1)
    with pytest.raises(RuntimeError, match="figure worker failed"):
        w.wait()
    w.cancel()


def _imports(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('MODULES', *sorted(sys.modules))"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return set(out.stdout.splitlines()[-1].split()[1:])


def test_help_imports_neither_torch_nor_plotting():
    mods = _imports(
        "from qmrkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    heavy = {"torch", "matplotlib", "h5py", "ismrmrd", "pydicom", "scipy", "nibabel"}
    assert not heavy & mods


def test_figure_worker_module_does_not_import_torch():
    # what the worker loads before its job: colormaps, fonts, Pillow; no Figure/Agg machinery
    mods = _imports("import qmrkit._figure as f, PIL.ImageDraw\nf._warm_up()")
    assert not {"torch", "matplotlib.pyplot", "matplotlib.figure", "matplotlib.axes"} & mods


def _entry(*argv: str) -> subprocess.CompletedProcess:
    """The console script's function (``qmrkit = qmrkit.cli:entry``) in a fresh process."""
    code = f"import sys; from qmrkit.cli import entry; sys.argv = {['qmrkit', *argv]!r}; entry()"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def test_console_entry_exits_with_main_status_and_complete_output(phantom_file):
    """entry() ends with os._exit after main(): the files, stdout and exit status are those of
    an in-process main() call (status 0, 2 for a user error) and nothing is lost unflushed."""
    tmp, path, obj = phantom_file
    out = tmp / "entry"
    argv = ["fit", "molli", "--data", str(path), "--ti", TI_ARG, "--out", str(out)]
    done = _entry(*argv, "--no-progress", "--timings")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("mask: auto, threshold ")
    assert lines[0].endswith(f", {int(obj.sum())} voxels")
    assert any(s.startswith("molli fitted by lm:") for s in lines)
    assert lines[-2].startswith("timings: ") and lines[-1].startswith("wrote 14 files to ")
    png = out / "maps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    side = json.loads((out / "fit.json").read_text())
    assert "figure_s" in side["Timings"] and side["VoxelsFitted"] == int(obj.sum())
    for stem in ("T1map", "T1starmap", "Amap", "Bmap", "residual", "converged"):
        assert (out / f"{stem}.nii.gz").is_file() and (out / f"{stem}.json").is_file()
    bad = _entry("fit", "molli", "--data", str(path), "--ti", "100,200", "--out", str(tmp / "x"))
    assert bad.returncode == 2 and "8 measurements" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    version = _entry("--version")
    assert version.returncode == 0 and version.stdout.startswith("qmrkit ")


def test_console_entry_keeps_the_normal_exit_steps(tmp_path):
    """Before os._exit: non-daemon threads finish, idle thread-pool workers are stopped (no hang),
    atexit handlers run, buffered stdout is flushed; the status is main()'s."""
    flag = tmp_path / "thread-done"
    code = (
        "import atexit, concurrent.futures, sys, threading, time\n"
        "import qmrkit.cli as cli\n"
        "pool = concurrent.futures.ThreadPoolExecutor(1)\n"
        "pool.submit(int, 1).result()  # an idle worker thread left behind\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        f"    open({str(flag)!r}, 'w').write('x')\n"
        "def main():\n"
        "    threading.Thread(target=late).start()\n"
        "    atexit.register(print, 'atexit ran')\n"
        "    print('buffered line')\n"
        "    return 3\n"
        "cli.main = main\n"
        "cli.entry()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines() == ["buffered line", "atexit ran"]
    assert flag.read_text() == "x"


def test_console_script_points_at_entry():
    text = (Path(SRC).parent / "pyproject.toml").read_text()
    assert 'qmrkit = "qmrkit.cli:entry"' in text


def test_reading_nifti_and_masking_import_no_raw_data_or_dicom_code():
    """qmrkit.io and qmrkit.pipelines import their members on first use: the NIfTI reader and
    the object mask (what ``qmrkit fit`` needs) pull in neither the reconstruction nor DICOM/MRD."""
    mods = _imports("import qmrkit.io.nifti, qmrkit.pipelines.masking")
    unwanted = {"qmrkit.recon", "qmrkit.sim", "qmrkit.pipelines.calibration"}
    unwanted |= {"qmrkit.io.dicom", "qmrkit.io.mrd", "qmrkit.io.bids", "h5py", "ismrmrd"}
    assert not unwanted & mods
    # the public names are the same objects as in their modules, submodules reachable as before
    code = (
        "import qmrkit.io as io, qmrkit.pipelines as pl\n"
        "from qmrkit.io.mrd import read_mrd\nfrom qmrkit.pipelines.calibration import"
        " noise_statistics\nfrom qmrkit.io import *\nfrom qmrkit.pipelines import *\n"
        "assert io.read_mrd is read_mrd and pl.noise_statistics is noise_statistics\n"
        "assert io.dicom.read_dicom is read_dicom and pl.diffusion.diffusion_maps is diffusion_maps\n"
        "assert 'load_nifti' in dir(io) and 'fit_maps' in dir(pl)"
    )
    assert {"qmrkit.io.dicom", "qmrkit.pipelines.mrf"} <= _imports(code)


@pytest.mark.parametrize(
    ("argv", "early"),
    [
        (["fit", "molli", "--data", "x.nii.gz"], True),
        (["-v", "fit", "t2"], True),
        (["fit", "molli", "--no-figure"], False),
        (["fit", "--help"], False),
        (["models"], False),
        (["recon", "--raw", "fit"], False),
        ([], False),
    ],
)
def test_figure_worker_starts_before_parsing_only_for_fit(argv, early):
    from qmrkit.cli import _early_figure

    worker = _early_figure(argv)
    try:
        assert (worker is not None) == early
    finally:
        if worker is not None:
            worker.cancel()
            assert worker._proc.poll() is not None  # ended, not left behind


def test_fit_user_error_ends_the_early_figure_worker(tmp_path, capsys, monkeypatch):
    """A fit that fails on its flags cancels the worker started before parsing (no PNG)."""
    from qmrkit import _figure

    started = []

    class Recorded(_figure.FigureWorker):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(_figure, "FigureWorker", Recorded)
    argv = ["fit", "molli", "--data", str(tmp_path / "missing.nii.gz"), "--ti", "1,2"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "missing.nii.gz" in capsys.readouterr().err
    assert len(started) == 1 and started[0]._proc.poll() is not None
    assert not (tmp_path / "o" / "maps.png").exists()
