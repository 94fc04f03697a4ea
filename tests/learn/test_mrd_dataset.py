"""Training samples from fully sampled ISMRMRD files (retrospective undersampling)."""

import pytest
import torch

from qmrkit import ops
from qmrkit.errors import DataFileError
from qmrkit.io.mrd import read_mrd
from qmrkit.learn import MrdDataset, sample_operator
from qmrkit.sim.raw import raw_scan


def test_mrd_dataset_from_fully_sampled_file(tmp_path):
    path = tmp_path / "full.h5"
    raw_scan((32, 32), n_coils=4, acceleration=1, n_noise_samples=0, seed=3, path=path)
    ds = MrdDataset(path, acceleration=4, seed=0, background=0.0)
    assert len(ds) == 1
    s = ds[0]
    assert tuple(s["maps"].shape) == (4, 32, 32) and tuple(s["target"].shape) == (32, 32)
    # the mask keeps about a quarter of the phase-encoding lines
    frac = float(s["mask"].float().mean())
    assert 0.2 <= frac <= 0.35, frac
    # targets peak at 1 and are the root sum of squares of the coil images
    k = read_mrd(path).kdata.reshape(4, 32, 32).to(torch.complex64)
    imgs = ops.FFT((4, 32, 32), axes=(-2, -1)).H(k)
    rss = imgs.abs().pow(2).sum(0).sqrt()
    assert float(s["target"].abs().max()) == pytest.approx(1.0, abs=1e-6)
    assert float((s["target"].real - rss / rss.max()).abs().max()) <= 1e-5
    # with background=0 the data are exactly the acquired k-space on the mask (scaled)
    ym = (k / rss.max()) * s["mask"]
    assert float((s["y"] - ym).abs().max() / ym.abs().max()) <= 1e-5
    # and consistent with the sample's operator
    A = sample_operator(s)
    assert float((A(s["target"]) - s["y"]).abs().max()) <= 1e-5


def test_mrd_dataset_refuses_undersampled_file(tmp_path):
    path = tmp_path / "r4.h5"
    raw_scan((32, 32), n_coils=4, acceleration=4, n_noise_samples=0, seed=3, path=path)
    with pytest.raises(DataFileError, match="not fully sampled"):
        MrdDataset(path)


def test_cli_trains_on_mrd_files(tmp_path):
    import json

    from qmrkit.cli import main

    train_f, val_f = tmp_path / "train.h5", tmp_path / "val.h5"
    raw_scan((16, 16), n_coils=2, acceleration=1, n_noise_samples=0, seed=1, path=train_f)
    raw_scan((16, 16), n_coils=2, acceleration=1, n_noise_samples=0, seed=2, path=val_f)
    out = tmp_path / "run"
    rc = main(
        ["learn", "train", "--out", str(out), "--data", str(train_f), "--val-data", str(val_f)]
        + ["--epochs", "1", "--unrolls", "2", "--channels", "4", "--layers", "2"]
        + ["--accel", "2", "--memory", "checkpoint", "--no-progress"]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["history"]) == 1
    assert m["history"][0]["val_nrmse"] < 1.0
