"""Training and evaluation of unrolled networks.

``train(model, dataset, ...)`` runs Adam on single samples (``batch_size`` samples are accumulated
per optimiser step, each with its own operator), validates with NRMSE / PSNR / SSIM after every
epoch, writes ``last.pt`` and ``best.pt`` checkpoints (``torch.save``) and resumes from
``last.pt``. A non-finite loss or gradient stops training before the optimiser step, so the model
and the last checkpoint keep the last good weights; :class:`NonFiniteLossError` says where and why.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._device import resolve_device
from .._progress import get_logger, progress_bar
from ..errors import DataFileError, NonFiniteLossError, ParameterError
from ..optim import cg as _cg
from .data import sample_operator
from .denoisers import ResidualCNN
from .unrolled import UnrolledNet

log = get_logger("learn.train")


# --------------------------------------------------------------------------------- metrics
def nrmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` (complex)."""
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Peak SNR in dB of the magnitudes, peak = ``max |ref|``."""
    a, b = x.abs(), ref.abs()
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(float(b.max()) ** 2 / mse)


def _gauss_window(size: int = 7, sigma: float = 1.5, dtype=torch.float32, device=None):
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_torch(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """Differentiable SSIM of magnitude images (2D, or the mean over the leading axes of 3D).

    Gaussian window 7×7 (σ = 1.5), K1 = 0.01, K2 = 0.03, ``data_range`` default ``max |ref|``.
    """
    a, b = x.abs(), ref.abs()
    if data_range is None:
        data_range = float(b.max()) or 1.0
    a = a.reshape(-1, 1, *a.shape[-2:])
    b = b.reshape(-1, 1, *b.shape[-2:])
    size = min(7, a.shape[-1], a.shape[-2])
    size = size if size % 2 else size - 1
    g = _gauss_window(size, 1.5, a.dtype, a.device)
    w = (g[:, None] * g[None, :])[None, None]

    def filt(t):
        return F.conv2d(t, w)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a**2
    sbb = filt(b * b) - mu_b**2
    sab = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.mean()


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """SSIM of the magnitudes (see :func:`ssim_torch`)."""
    with torch.no_grad():
        return float(ssim_torch(x, ref))


def _loss_fn(loss: str | Callable) -> Callable:
    if callable(loss):
        return loss
    if loss == "l2":
        return lambda x, t: (x - t).abs().pow(2).mean()
    if loss == "l1":
        return lambda x, t: (x - t).abs().mean()
    if loss == "ssim":
        return lambda x, t: 1 - ssim_torch(x, t)
    raise ParameterError(f"train: loss must be 'l1', 'l2', 'ssim' or a callable, got {loss!r}")


# --------------------------------------------------------------------------------- helpers
def _to(sample: dict, device, cdtype) -> dict:
    out = {}
    for k, v in sample.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_complex():
                v = v.to(cdtype)
        out[k] = v
    return out


def _model_cdtype(model: torch.nn.Module):
    p = next(model.parameters())
    return torch.complex128 if p.dtype == torch.float64 else torch.complex64


def model_config(model: UnrolledNet) -> dict:
    """Constructor arguments of an :class:`UnrolledNet` with a :class:`ResidualCNN` (for saving)."""
    den = model.denoisers[0]
    if not isinstance(den, ResidualCNN):
        return {}
    dc = model.dcs[0]
    return dict(
        n_unrolls=model.n_unrolls,
        denoiser=dict(den.config),
        data_consistency=model.data_consistency,
        shared_weights=model.shared_weights,
        memory=model.memory,
        cg_tol=dc.cg_tol,
        cg_max_iter=dc.cg_max_iter,
        checkpoint_every=model.checkpoint_every,
    )


def build_model(config: dict) -> UnrolledNet:
    """Inverse of :func:`model_config`."""
    cfg = dict(config)
    den = ResidualCNN(**cfg.pop("denoiser"))
    return UnrolledNet(cfg.pop("n_unrolls"), den, **cfg)


def load_model(path, device=None) -> UnrolledNet:
    """Build an :class:`UnrolledNet` from a checkpoint written by :func:`train`."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise DataFileError(f"cannot read checkpoint {path}: {exc}") from exc
    if not ck.get("model_config"):
        raise DataFileError(f"checkpoint {path} has no model_config (not written by learn.train?)")
    model = build_model(ck["model_config"])
    model.load_state_dict(ck["model"])
    return model.to(resolve_device(device))


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_nrmse: float | None = None
    stopped: str = "completed"
    steps: int = 0
    elapsed_s: float = 0.0
    checkpoint_dir: str | None = None


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, device=None) -> dict:
    """Mean NRMSE, PSNR (dB) and SSIM of ``model`` over ``dataset`` (no gradients)."""
    dev = resolve_device(device, next(model.parameters()))
    cdt = _model_cdtype(model)
    was = model.training
    model.eval()
    vals = {"nrmse": [], "psnr": [], "ssim": []}
    for i in range(len(dataset)):
        s = _to(dataset[i], dev, cdt)
        x = model(s["y"], sample_operator(s))
        vals["nrmse"].append(nrmse(x, s["target"]))
        vals["psnr"].append(psnr(x, s["target"]))
        vals["ssim"].append(ssim(x, s["target"]))
    model.train(was)
    return {k: float(np.mean(v)) for k, v in vals.items()}


@torch.no_grad()
def baselines(dataset, cg_iters: int = 10, lams=(0.0, 1e-3, 1e-2, 1e-1), device=None) -> dict:
    """Classical references on ``dataset``: zero-filled ``Aᴴy`` and CG-SENSE.

    CG-SENSE solves ``(AᴴA + λI) x = Aᴴy`` with ``cg_iters`` iterations for each ``λ`` in ``lams``
    and reports the best mean NRMSE (an optimistic baseline: λ tuned on the same data).
    """
    dev = resolve_device(device)
    zf = {"nrmse": [], "psnr": [], "ssim": []}
    cgs = {lam: [] for lam in lams}
    for i in range(len(dataset)):
        s = _to(dataset[i], dev, torch.complex64)
        A = sample_operator(s)
        x0 = A.H(s["y"])
        zf["nrmse"].append(nrmse(x0, s["target"]))
        zf["psnr"].append(psnr(x0, s["target"]))
        zf["ssim"].append(ssim(x0, s["target"]))
        for lam in lams:
            x = _cg(A, x0, lam=lam, max_iter=cg_iters, tol=0).x
            cgs[lam].append((nrmse(x, s["target"]), psnr(x, s["target"]), ssim(x, s["target"])))
    best = min(lams, key=lambda lam: np.mean([v[0] for v in cgs[lam]]))
    arr = np.array(cgs[best])
    return {
        "zero_filled": {k: float(np.mean(v)) for k, v in zf.items()},
        "cg_sense": {
            "nrmse": float(arr[:, 0].mean()),
            "psnr": float(arr[:, 1].mean()),
            "ssim": float(arr[:, 2].mean()),
            "lam": best,
            "iterations": cg_iters,
        },
    }


def train(
    model: UnrolledNet,
    dataset,
    *,
    val_dataset=None,
    epochs: int = 10,
    lr: float = 1e-3,
    loss: str | Callable = "l2",
    batch_size: int = 1,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    grad_clip: float | None = None,
    device=None,
    progress: bool | None = None,
) -> TrainResult:
    """Train an unrolled network with Adam.

    Parameters
    ----------
    model : UnrolledNet
    dataset, val_dataset : datasets of sample dicts (see :mod:`qmrkit.learn.data`)
    epochs : int
        Passes over ``dataset`` (samples shuffled per epoch from ``seed``).
    lr : float
        Adam learning rate.
    loss : {"l2", "l1", "ssim"} or callable ``loss(x, target)``
    batch_size : int
        Samples whose gradients are accumulated per optimiser step (each sample keeps its own
        operator; memory stays that of one sample).
    checkpoint_dir : path, optional
        Writes ``last.pt`` after every epoch and ``best.pt`` at the best validation NRMSE.
    resume : bool
        Continue from ``checkpoint_dir/last.pt`` (model, optimiser, epoch, history, RNG state).
    seed : int
        Seeds the shuffling and torch's generators.
    grad_clip : float, optional
        Clip the global gradient norm.
    device : device, optional
        Default: the model's device.

    Raises
    ------
    NonFiniteLossError
        A loss or gradient became NaN/Inf; the model keeps its last good weights and the last
        checkpoint is untouched.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ParameterError(
            f"train: need epochs >= 1, batch_size >= 1 and lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    if len(dataset) == 0:
        raise ParameterError("train: the dataset is empty")
    lossf = _loss_fn(loss)
    dev = resolve_device(device, next(model.parameters()))
    model.to(dev)
    cdt = _model_cdtype(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    result = TrainResult(checkpoint_dir=str(ckdir) if ckdir else None)
    start_epoch = 0
    _seed_all(seed)
    if resume:
        if ckdir is None or not (ckdir / "last.pt").exists():
            raise DataFileError(f"train: resume=True but no checkpoint at {ckdir}/last.pt")
        ck = torch.load(ckdir / "last.pt", map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch = ck["epoch"] + 1
        result.history = ck["history"]
        result.best_epoch, result.best_val_nrmse = ck.get("best_epoch"), ck.get("best_val_nrmse")
        result.steps = ck.get("steps", 0)
        torch.set_rng_state(ck["torch_rng"])
        log.info("resumed from %s at epoch %d", ckdir / "last.pt", start_epoch)
    if ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    last_good = None
    gen = np.random.default_rng(seed)
    for _ in range(start_epoch):  # same shuffles as an uninterrupted run
        gen.permutation(len(dataset))
    bar = progress_bar((epochs - start_epoch) * len(dataset), desc="train", progress=progress)
    with bar:
        for epoch in range(start_epoch, epochs):
            model.train()
            order = gen.permutation(len(dataset))
            losses = []
            for b0 in range(0, len(order), batch_size):
                opt.zero_grad(set_to_none=True)
                batch_losses = []
                for i in order[b0 : b0 + batch_size]:
                    s = _to(dataset[int(i)], dev, cdt)
                    x = model(s["y"], sample_operator(s))
                    li = lossf(x, s["target"])
                    if not torch.isfinite(li):
                        _stop(
                            result,
                            epoch,
                            result.steps,
                            f"loss is {float(li.detach())}",
                            ckdir,
                            last_good,
                        )
                    (li / batch_size).backward()
                    batch_losses.append(float(li.detach()))
                    bar.update(1)
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                gnorm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads])
                )
                if not torch.isfinite(gnorm):
                    _stop(
                        result, epoch, result.steps, "the gradient is not finite", ckdir, last_good
                    )
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                opt.step()
                result.steps += 1
                losses.append(float(np.mean(batch_losses)))
                bar.set_postfix(loss=f"{losses[-1]:.3g}")
            rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": result.steps}
            if val_dataset is not None:
                v = evaluate(model, val_dataset, dev)
                rec.update({f"val_{k}": val for k, val in v.items()})
                if not math.isfinite(v["nrmse"]):
                    _stop(
                        result,
                        epoch,
                        result.steps,
                        "validation NRMSE is not finite",
                        ckdir,
                        last_good,
                    )
                if result.best_val_nrmse is None or v["nrmse"] < result.best_val_nrmse:
                    result.best_val_nrmse, result.best_epoch = v["nrmse"], epoch
                    if ckdir is not None:
                        _save(ckdir / "best.pt", model, opt, epoch, result)
            result.history.append(rec)
            log.info("epoch %d: %s", epoch, rec)
            if ckdir is not None:
                _save(ckdir / "last.pt", model, opt, epoch, result)
                last_good = (ckdir / "last.pt", epoch)
    result.elapsed_s = time.perf_counter() - t0
    return result


def _save(path: Path, model, opt, epoch: int, result: TrainResult) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "history": copy.deepcopy(result.history),
            "best_epoch": result.best_epoch,
            "best_val_nrmse": result.best_val_nrmse,
            "steps": result.steps,
            "torch_rng": torch.get_rng_state(),
            "model_config": model_config(model),
        },
        tmp,
    )
    tmp.replace(path)


def _stop(result: TrainResult, epoch: int, step: int, why: str, ckdir, last_good) -> None:
    result.stopped = f"non-finite: {why}"
    where = (
        f"the last good checkpoint is {last_good[0]} (epoch {last_good[1]})"
        if last_good
        else "no checkpoint was written yet"
        if ckdir is not None
        else "no checkpoint_dir was given"
    )
    msg = (
        f"train: stopped at epoch {epoch}, step {step}: {why}; the optimiser step was skipped, so "
        f"the model keeps its last good weights; {where}. Try a lower lr, grad_clip, or check "
        "the data scaling"
    )
    log.error(msg)
    raise NonFiniteLossError(msg)


__all__ = [
    "train",
    "evaluate",
    "baselines",
    "TrainResult",
    "NonFiniteLossError",
    "nrmse",
    "psnr",
    "ssim",
    "ssim_torch",
    "model_config",
    "build_model",
    "load_model",
]
