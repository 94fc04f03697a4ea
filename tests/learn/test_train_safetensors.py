"""Safetensors checkpoints of ``learn.train``: bit-identical resume, load_model, layout, errors."""

import json
import logging
import sys

import pytest
import torch

from qmrkit.cli import main
from qmrkit.errors import DataFileError, OptionalDependencyError, ParameterError
from qmrkit.learn import (
    ResidualCNN,
    SyntheticDataset,
    UnrolledNet,
    load_model,
    model_config,
    sample_operator,
    train,
)

KW = dict(lr=1e-2, seed=5, batch_size=2)


def _net():
    torch.manual_seed(0)
    return UnrolledNet(
        2, ResidualCNN(2, channels=4, layers=2), memory="standard", lam=0.1, cg_max_iter=5
    )


def _data():
    return (
        SyntheticDataset(4, (16, 16), n_coils=2, seed=3),
        SyntheticDataset(1, (16, 16), n_coils=2, seed=4),
    )


def _out(model, sample):
    model.eval()
    with torch.no_grad():
        return model(sample["y"], sample_operator(sample))


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: threads only add overhead on shared cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """A straight 3-epoch run with torch checkpoints, and 2 + 1 epochs with safetensors."""
    pytest.importorskip("safetensors")
    tr, va = _data()
    dt, ds = tmp_path_factory.mktemp("torch"), tmp_path_factory.mktemp("st")
    a = _net()
    ra = train(a, tr, val_dataset=va, epochs=3, checkpoint_dir=dt, **KW)
    train(
        _net(),
        tr,
        val_dataset=va,
        epochs=2,
        checkpoint_dir=ds,
        checkpoint_format="safetensors",
        **KW,
    )
    b = _net()
    rb = train(
        b,
        tr,
        val_dataset=va,
        epochs=3,
        checkpoint_dir=ds,
        checkpoint_format="safetensors",
        resume=True,
        **KW,
    )
    return dict(a=a, ra=ra, b=b, rb=rb, dt=dt, ds=ds, tr=tr, va=va)


def test_safetensors_resume_matches_uninterrupted_torch_run(runs):
    for pa, pb in zip(runs["a"].parameters(), runs["b"].parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert runs["rb"].history == runs["ra"].history
    assert runs["rb"].best_epoch == runs["ra"].best_epoch
    assert runs["rb"].steps == runs["ra"].steps == 6
    names = sorted(p.name for p in runs["ds"].iterdir())
    assert names == ["best.safetensors", "last.safetensors"]  # no .pt, no temporary files


def test_load_model_safetensors_reproduces_outputs(runs):
    s = runs["va"][0]
    best_st = load_model(runs["ds"] / "best.safetensors")
    best_pt = load_model(runs["dt"] / "best.pt")
    assert torch.equal(_out(best_st, s), _out(best_pt, s))
    assert torch.equal(_out(load_model(runs["ds"] / "last.safetensors"), s), _out(runs["b"], s))


def test_safetensors_file_layout(runs):
    from safetensors import safe_open

    with safe_open(str(runs["ds"] / "last.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        rng = f.get_tensor("rng.torch")
        rho = f.get_tensor("model.dcs.0.rho")
    assert json.loads(meta["model_config"]) == model_config(runs["b"])
    assert json.loads(meta["epoch"]) == 2 and meta["format_version"] == "1"
    assert len(json.loads(meta["history"])) == 3
    opt = json.loads(meta["optimizer"])
    assert opt["param_groups"][0]["lr"] == KW["lr"]
    assert {"optimizer.state.0.exp_avg", "optimizer.state.0.exp_avg_sq"} <= keys
    assert rng.dtype == torch.uint8 and torch.equal(rho, runs["b"].dcs[0].rho.detach())


def test_mixed_formats_resume_from_the_newer(runs, tmp_path, caplog):
    tr, va = runs["tr"], runs["va"]
    train(_net(), tr, val_dataset=va, epochs=1, checkpoint_dir=tmp_path, **KW)
    train(
        _net(),
        tr,
        val_dataset=va,
        epochs=2,
        checkpoint_dir=tmp_path,
        checkpoint_format="safetensors",
        resume=True,
        **KW,
    )
    c = _net()
    with caplog.at_level(logging.INFO, logger="qmrkit.learn.train"):
        train(c, tr, val_dataset=va, epochs=3, checkpoint_dir=tmp_path, resume=True, **KW)
    assert "using the newer by epoch: last.safetensors" in caplog.text
    for pa, pc in zip(runs["a"].parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pc)


def test_cli_safetensors_train_and_eval(tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "run"
    common = ["--n-val", "1", "--shape", "16", "16", "--coils", "2"]
    rc = main(
        ["learn", "train", "--out", str(out), "--n", "2", "--epochs", "1", "--unrolls", "1"]
        + ["--channels", "4", "--layers", "2", "--checkpoint-format", "safetensors"]
        + ["--no-progress", *common]
    )
    assert rc == 0 and (out / "best.safetensors").exists() and not (out / "last.pt").exists()
    rc = main(["learn", "eval", "--checkpoint", str(out / "best.safetensors"), *common])
    assert rc == 0


def test_bad_format_and_foreign_file(tmp_path):
    tr, _ = _data()
    with pytest.raises(ParameterError, match="checkpoint_format must be 'torch' or 'safetensors'"):
        train(_net(), tr, epochs=1, checkpoint_format="pickle")
    st = pytest.importorskip("safetensors.torch")
    st.save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(DataFileError, match="without qmrkit checkpoint metadata"):
        load_model(tmp_path / "w.safetensors")
    with pytest.raises(DataFileError, match="cannot read checkpoint"):
        load_model(tmp_path / "missing.safetensors")


def test_missing_safetensors_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    tr, _ = _data()
    msg = r"pip install 'qmrkit\[learn\]'"
    with pytest.raises(OptionalDependencyError, match=msg):
        train(_net(), tr, epochs=1, checkpoint_dir=tmp_path, checkpoint_format="safetensors")
    assert not any(tmp_path.iterdir())  # failed before training
    with pytest.raises(ImportError, match=msg):
        load_model(tmp_path / "best.safetensors")
