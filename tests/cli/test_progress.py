"""Progress bars: one decision (terminal, notebook, --quiet), honest totals."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest

from qmrkit import _progress, fit, models
from qmrkit.io import save_nifti
from qmrkit.sim import MOLLI_TI, molli_series


@pytest.fixture
def bars(monkeypatch):
    """Record every tqdm bar a run creates (drawn into a string, not the terminal)."""
    from tqdm import tqdm

    made = []

    def make(**kw):
        bar = tqdm(file=io.StringIO(), **kw)
        made.append(bar)
        return bar

    monkeypatch.setattr(_progress, "_tqdm", make)
    return made


def _molli(shape=(9, 7), seed=0):
    t1 = np.random.default_rng(seed).uniform(400, 2000, shape)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=100, seed=seed)
    return series.astype(np.float32)


def test_lm_bar_counts_voxels_to_the_total(bars):
    series = _molli()
    V = series.shape[0] * series.shape[1]
    res = fit.lm(models.MolliT1(MOLLI_TI), series, progress=True, batch_size=20)  # 4 chunks
    (bar,) = bars
    assert bar.total == V == res.n_voxels and bar.n == V
    assert bar.unit == "voxel"


def test_lm_bar_reaches_the_total_when_voxels_stop_at_max_iter(bars):
    series = _molli(seed=1)
    with pytest.warns(Warning):
        # from the typical start (the closed-form one is converged after one iteration)
        fit.lm(models.MolliT1(MOLLI_TI), series, progress=True, max_iter=1, start="typical")
    assert bars[0].n == bars[0].total == series[..., 0].size


def test_dictionary_bar_covers_the_whole_simulation(bars):
    from qmrkit import mrf

    sched = mrf.fisp_schedule(50)
    d = mrf.Dictionary.build(sched, t1=[300, 800, 1500], t2=[20, 80, 400], progress=True)
    (bar,) = bars
    assert bar.n == bar.total > 0 and f"EPG {d.n_atoms} atoms" in bar.desc


def test_resolution_of_progress_none(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert _progress.progress_enabled(None) is False
    assert _progress.progress_enabled(True) is True
    previous = _progress.set_progress_default(True)
    try:
        assert _progress.progress_enabled(None) is True
        assert _progress.progress_enabled(False) is False
        _progress.set_progress_default(False)
        assert _progress.progress_enabled(None) is False
    finally:
        _progress.set_progress_default(previous)
    assert isinstance(_progress.progress_bar(10, progress=False), _progress._NullBar)


def _stderr_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (where bars are on by default)."""
    master, slave = pty.openpty()
    # a new pty is 0 columns wide, where tqdm draws nothing; a real terminal has a size
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmrkit", *argv], stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    proc.stdout.read()
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def test_bar_on_a_terminal_and_silent_with_quiet(tmp_path):
    save_nifti(tmp_path / "s.nii.gz", _molli())
    ti = ",".join(str(t) for t in MOLLI_TI)
    argv = ["fit", "molli", "--data", str(tmp_path / "s.nii.gz"), "--ti", ti, "--no-figure"]
    rc, err = _stderr_on_a_terminal([*argv, "--out", str(tmp_path / "a")])
    assert rc == 0 and "lm:" in err and "voxel" in err  # the default on a terminal: a bar
    rc, err = _stderr_on_a_terminal([*argv, "--out", str(tmp_path / "b"), "--quiet"])
    assert rc == 0 and err == ""
    rc, err = _stderr_on_a_terminal(["--quiet", *argv, "--out", str(tmp_path / "c"), "--progress"])
    assert rc == 0 and err == ""  # --quiet wins over --progress
