"""Training loop, datasets, metrics, checkpoints and failure handling."""

import numpy as np
import pytest
import torch

from qmrkit.errors import DataFileError, ParameterError, ShapeError
from qmrkit.learn import (
    ArrayDataset,
    NonFiniteLossError,
    ResidualCNN,
    SyntheticDataset,
    UnrolledNet,
    baselines,
    evaluate,
    load_model,
    sample_operator,
    train,
)
from qmrkit.learn.data import cartesian_mask, coil_maps
from qmrkit.learn.train import psnr, ssim


def _small_net(n=2, memory="standard", **kw):
    torch.manual_seed(0)
    return UnrolledNet(
        n,
        ResidualCNN(2, channels=8, layers=3, **kw),
        memory=memory,
        lam=0.1,
        cg_max_iter=10,
        cg_tol=1e-5,
    )


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: threads only add overhead on shared cores
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_training_beats_zero_filled_and_cg_sense(one_thread):
    tr = SyntheticDataset(24, (32, 32), n_coils=4, acceleration=4, noise=0.02, seed=1)
    va = SyntheticDataset(6, (32, 32), n_coils=4, acceleration=4, noise=0.02, seed=2)
    base = baselines(va)  # CG-SENSE: best of 4 λ at 10 iterations (tuned on the validation set)
    torch.manual_seed(0)
    net = UnrolledNet(
        3,
        ResidualCNN(2, channels=16, layers=4),
        memory="checkpoint",
        lam=0.1,
        cg_max_iter=10,
        cg_tol=1e-5,
    )
    res = train(net, tr, val_dataset=va, epochs=5, lr=1e-2, seed=0)
    final = res.history[-1]["val_nrmse"]
    assert final < 0.97 * base["cg_sense"]["nrmse"], (final, base)
    assert final < 0.75 * base["zero_filled"]["nrmse"], (final, base)
    assert res.history[-1]["val_psnr"] > base["cg_sense"]["psnr"]


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    tr = SyntheticDataset(4, (16, 16), n_coils=2, seed=3)
    va = SyntheticDataset(2, (16, 16), n_coils=2, seed=4)
    a = _small_net()
    ra = train(a, tr, val_dataset=va, epochs=2, lr=1e-3, seed=5, batch_size=2)
    b = _small_net()
    train(b, tr, val_dataset=va, epochs=1, lr=1e-3, seed=5, batch_size=2, checkpoint_dir=tmp_path)
    b2 = _small_net()
    rb = train(
        b2,
        tr,
        val_dataset=va,
        epochs=2,
        lr=1e-3,
        seed=5,
        batch_size=2,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    for pa, pb in zip(a.parameters(), b2.parameters(), strict=False):
        assert torch.equal(pa, pb)
    assert len(rb.history) == 2 and rb.history[-1]["val_nrmse"] == ra.history[-1]["val_nrmse"]
    assert (tmp_path / "best.pt").exists()
    m = load_model(tmp_path / "last.pt")
    assert evaluate(m, va)["nrmse"] == pytest.approx(ra.history[-1]["val_nrmse"], rel=1e-6)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tr = SyntheticDataset(3, (16, 16), n_coils=2, seed=3)
    calls = {"n": 0}

    def bad_loss(x, t):
        calls["n"] += 1
        l2 = (x - t).abs().pow(2).mean()
        return l2 * float("nan") if calls["n"] > 4 else l2

    net = _small_net()
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan.*last good checkpoint is .*last.pt \(epoch 0\)"
    ):
        train(net, tr, epochs=3, loss=bad_loss, checkpoint_dir=tmp_path)
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["epoch"] == 0
    # the step with the NaN loss was skipped: parameters are finite
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_losses_and_memory_modes_train():
    tr = SyntheticDataset(2, (16, 16), n_coils=2, seed=3)
    for loss, mem in [("l1", "checkpoint"), ("ssim", "reversible")]:
        net = _small_net(memory=mem, spectral_norm=True)
        r = train(net, tr, epochs=1, loss=loss)
        assert np.isfinite(r.history[0]["train_loss"])
    with pytest.raises(ParameterError, match="loss must be"):
        train(_small_net(), tr, epochs=1, loss="huber")
    with pytest.raises(DataFileError, match="resume=True but no checkpoint"):
        train(_small_net(), tr, epochs=1, resume=True)


@pytest.mark.parametrize("kind,shape", [("2d", (16, 16)), ("3d", (4, 8, 8)), ("2d+t", (4, 8, 8))])
def test_synthetic_dataset_consistent(kind, shape):
    d = SyntheticDataset(2, shape, n_coils=3, acceleration=3, noise=0.0, kind=kind, seed=0)
    s = d[0]
    A = sample_operator(s)
    assert torch.allclose(A(s["target"]), s["y"], atol=1e-5)
    assert s["target"].abs().max() == pytest.approx(1.0, rel=1e-5)
    d2 = SyntheticDataset(2, shape, n_coils=3, acceleration=3, noise=0.0, kind=kind, seed=0)
    assert torch.equal(d2[1]["y"], d[1]["y"])  # reproducible


def test_coil_maps_and_masks():
    maps = coil_maps((16, 16), 4)
    assert np.allclose((np.abs(maps) ** 2).sum(0), 1, atol=1e-5)
    m = cartesian_mask((64, 64), 4, seed=1)
    assert m.shape == (64, 1) and m.sum() == 16 and m[30:34].all()


def test_array_dataset_and_errors(tmp_path):
    syn = SyntheticDataset(2, (16, 16), n_coils=2, seed=0)
    ks = torch.stack([s["y"] for s in syn.samples]).numpy()
    maps = torch.stack([s["maps"] for s in syn.samples]).numpy()
    masks = torch.stack([s["mask"] for s in syn.samples]).numpy()
    tg = torch.stack([s["target"] for s in syn.samples]).numpy()
    ds = ArrayDataset(ks, maps, masks, tg)
    assert torch.equal(ds[1]["y"], syn[1]["y"])
    np.savez(tmp_path / "d.npz", kspace=ks, maps=maps, masks=masks, targets=tg)
    assert len(ArrayDataset.from_npz(tmp_path / "d.npz")) == 2
    with pytest.raises(ShapeError, match="targets must have shape"):
        ArrayDataset(ks, maps, masks, tg[:, :8])
    with pytest.raises(DataFileError, match="expected an .npz file"):
        ArrayDataset.from_npz(tmp_path / "missing.npz")


def test_metrics():
    x = torch.rand(16, 16, dtype=torch.float64).to(torch.complex128)
    assert ssim(x, x) == pytest.approx(1.0)
    assert psnr(x, x) == float("inf")
    assert psnr(x * 0.9, x) < 40
