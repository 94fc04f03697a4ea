"""Training and evaluation of unrolled networks.

``train(model, dataset, ...)`` runs Adam on single samples (``batch_size`` samples are accumulated
per optimiser step, each with its own operator), validates with NRMSE / PSNR / SSIM after every
epoch, writes ``last`` and ``best`` checkpoints and resumes from ``last``. Checkpoints are
``last.pt`` / ``best.pt`` (``torch.save``, the default) or, with
``checkpoint_format="safetensors"``, ``last.safetensors`` / ``best.safetensors``: every tensor
(model, Adam moments, RNG state) as a named tensor and the rest (model config, epoch, history,
optimiser hyper-parameters) as JSON in the file's metadata. Reading a ``.safetensors`` checkpoint
never unpickles anything, so it cannot run code hidden in the file. A non-finite loss or gradient
stops training before the optimiser step, so the model and the last checkpoint keep the last good
weights; :class:`NonFiniteLossError` says where and why.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._device import resolve_device
from .._optional import require
from .._progress import get_logger, progress_bar
from ..errors import DataFileError, NonFiniteLossError, OptionalDependencyError, ParameterError
from ..optim import cg as _cg
from .data import sample_operator
from .denoisers import CouplingCNN, ResidualCNN
from .unrolled import UnrolledNet

log = get_logger("learn.train")

#: values of ``train(checkpoint_format=...)`` and their file suffixes
CHECKPOINT_FORMATS = {"torch": ".pt", "safetensors": ".safetensors"}
_ST_FORMAT = "qmrkit.learn.train checkpoint"  # metadata["format"] of our .safetensors files
_ST_VERSION = 1


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
    """Constructor arguments of an :class:`UnrolledNet` with a :class:`ResidualCNN` or
    :class:`CouplingCNN` denoiser (for saving; ``{}`` for other denoisers)."""
    den = model.denoisers[0]
    if not isinstance(den, (ResidualCNN, CouplingCNN)):
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
    dcfg = dict(cfg.pop("denoiser"))
    kind = dcfg.pop("kind", "residual")  # configs written before CouplingCNN have no kind
    if kind == "coupling":
        den: torch.nn.Module = CouplingCNN(**dcfg)
    elif kind == "residual":
        den = ResidualCNN(**dcfg)
    else:
        raise DataFileError(f"model config names an unknown denoiser kind {kind!r}")
    return UnrolledNet(cfg.pop("n_unrolls"), den, **cfg)


def load_model(path, device=None) -> UnrolledNet:
    """Build an :class:`UnrolledNet` from a checkpoint written by :func:`train`.

    ``path`` is a ``.pt`` file (``torch.load``, which unpickles: load only files you trust) or a
    ``.safetensors`` file (tensors and JSON only, nothing is unpickled; needs the ``safetensors``
    package, ``pip install 'qmrkit[learn]'``); the format is chosen by the suffix.
    """
    ck = _read_checkpoint(path, "cpu")
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


# ----------------------------------------------------------------------------- checkpoints
def _safetensors():
    """``safetensors.torch``, or :class:`OptionalDependencyError` naming ``qmrkit[learn]``."""
    require("safetensors")
    import safetensors.torch

    return safetensors.torch


def _checkpoint_state(model, opt, epoch: int, result: TrainResult) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "history": copy.deepcopy(result.history),
        "best_epoch": result.best_epoch,
        "best_val_nrmse": result.best_val_nrmse,
        "steps": result.steps,
        "torch_rng": torch.get_rng_state(),
        "model_config": model_config(model),
    }


def _flatten(ck: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint dict as safetensors tensors (``model.*``, ``optimizer.state.<i>.<key>``,
    ``rng.torch``) and str -> str metadata (JSON for everything that is not a tensor)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in ck["model"].items():
        if not isinstance(v, torch.Tensor):
            raise ParameterError(
                f"train: checkpoint_format='safetensors' stores tensors only, but the model's "
                f"state entry {k!r} is a {type(v).__name__}; use checkpoint_format='torch'"
            )
        tensors[f"model.{k}"] = v
    opt_state = {}
    for i, st in ck["optimizer"]["state"].items():
        tkeys = [k for k, v in st.items() if isinstance(v, torch.Tensor)]
        for k in tkeys:
            tensors[f"optimizer.state.{i}.{k}"] = st[k]
        values = {k: v for k, v in st.items() if k not in tkeys}
        opt_state[str(i)] = {"tensors": tkeys, "values": values}
    tensors["rng.torch"] = ck["torch_rng"]
    # safetensors refuses tensors that share memory and non-contiguous ones: copy those
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen or not v.is_contiguous():
            v = v.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[k] = v
    optimizer = {"param_groups": ck["optimizer"]["param_groups"], "state": opt_state}
    meta = {"format": _ST_FORMAT, "format_version": str(_ST_VERSION)}
    for k in ("model_config", "epoch", "history", "best_epoch", "best_val_nrmse", "steps"):
        meta[k] = json.dumps(ck[k])
    try:
        meta["optimizer"] = json.dumps(optimizer)
    except TypeError as exc:
        raise ParameterError(
            f"train: optimiser settings are not JSON-serialisable ({exc}); "
            "use checkpoint_format='torch'"
        ) from exc
    return out, meta


def _unflatten(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    """Inverse of :func:`_flatten`."""
    ck = {k: json.loads(meta[k]) for k in ("model_config", "epoch", "history")}
    for k in ("best_epoch", "best_val_nrmse", "steps"):
        ck[k] = json.loads(meta.get(k, "null"))
    ck["model"] = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer = json.loads(meta["optimizer"])
    state = {}
    for i, st in optimizer["state"].items():
        d = {k: tensors[f"optimizer.state.{i}.{k}"] for k in st["tensors"]}
        d.update(st["values"])
        state[int(i)] = d
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in optimizer["param_groups"]
    ]  # JSON turned tuples (Adam's betas) into lists
    ck["optimizer"] = {"state": state, "param_groups": groups}
    ck["torch_rng"] = tensors["rng.torch"]
    return ck


def _read_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`train` (``.pt`` or ``.safetensors``) as a dict."""
    path = Path(path)
    if path.suffix != ".safetensors":
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            # a truncated or foreign file: torch raises any of these
            raise DataFileError(f"cannot read checkpoint {path}: {exc}") from exc
    _safetensors()
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise DataFileError(f"cannot read checkpoint {path}: {exc}") from exc
    if meta.get("format") != _ST_FORMAT:
        raise DataFileError(
            f"checkpoint {path} is a safetensors file without qmrkit checkpoint metadata "
            f"(not written by learn.train?)"
        )
    if int(meta.get("format_version", "0")) > _ST_VERSION:
        raise DataFileError(
            f"checkpoint {path} has format_version {meta['format_version']}; this qmrkit reads "
            f"up to {_ST_VERSION} (upgrade qmrkit)"
        )
    try:
        return _unflatten(tensors, meta)
    except (KeyError, ValueError) as exc:
        raise DataFileError(f"checkpoint {path} is incomplete or corrupt: {exc!r}") from exc


def _resume_checkpoint(ckdir: Path | None, map_location) -> tuple[Path, dict]:
    """The checkpoint to resume from: ``last.pt`` or ``last.safetensors``; if both exist, the
    one with the later epoch (equal epochs: the later modification time)."""
    cands = [ckdir / f"last{s}" for s in CHECKPOINT_FORMATS.values()] if ckdir else []
    cands = [p for p in cands if p.exists()]
    if not cands:
        raise DataFileError(
            f"train: resume=True but no checkpoint at {ckdir}/last.pt or {ckdir}/last.safetensors"
        )
    loaded = []
    for p in cands:
        try:
            loaded.append((p, _read_checkpoint(p, map_location)))
        except OptionalDependencyError:
            if len(cands) == 1:
                raise
            log.warning("resume: ignoring %s (safetensors is not installed)", p)
    if len(loaded) == 1:
        return loaded[0]
    (pa, a), (pb, b) = loaded
    by = "epoch" if a["epoch"] != b["epoch"] else "modification time"
    key = (lambda pc: pc[1]["epoch"]) if by == "epoch" else (lambda pc: pc[0].stat().st_mtime)
    path, ck = max(loaded, key=key)
    log.info(
        "resume: both %s (epoch %d) and %s (epoch %d) exist; using the newer by %s: %s",
        pa.name,
        a["epoch"],
        pb.name,
        b["epoch"],
        by,
        path.name,
    )
    return path, ck


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
    checkpoint_format: str = "torch",
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
        Writes ``last`` after every epoch and ``best`` at the best validation NRMSE (atomically:
        a temporary file, then a rename).
    resume : bool
        Continue from ``checkpoint_dir/last.pt`` or ``last.safetensors`` (model, optimiser,
        epoch, history, RNG state), whichever exists; if both do, the one with the later epoch
        (equal epochs: the later modification time), as the log says. Either format resumes an
        interrupted run bit for bit, whatever ``checkpoint_format`` is now.
    checkpoint_format : {"torch", "safetensors"}
        ``"torch"``: ``last.pt`` / ``best.pt`` written with ``torch.save`` (reading them
        unpickles, which can run code from an untrusted file). ``"safetensors"``:
        ``last.safetensors`` / ``best.safetensors`` with the model state, the optimiser state
        (Adam moments and step counts as named tensors) and the RNG state (uint8) as tensors,
        and the model config, epoch, history and optimiser hyper-parameters as JSON metadata;
        reading them never unpickles anything. Needs ``pip install 'qmrkit[learn]'``.
    seed : int
        Seeds the shuffling and torch's generators.
    grad_clip : float, optional
        Clip the global gradient norm.
    device : device, optional
        Default: the model's device.

    Raises
    ------
    ParameterError
        Bad ``epochs``, ``batch_size``, ``lr``, ``loss`` or ``checkpoint_format``.
    OptionalDependencyError
        ``checkpoint_format="safetensors"`` without the ``safetensors`` package.
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
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ParameterError(
            f"train: checkpoint_format must be 'torch' or 'safetensors', got {checkpoint_format!r}"
        )
    if checkpoint_format == "safetensors":
        _safetensors()  # fail now, not after the first epoch
    suffix = CHECKPOINT_FORMATS[checkpoint_format]
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
        ck_path, ck = _resume_checkpoint(ckdir, dev)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch = ck["epoch"] + 1
        result.history = ck["history"]
        result.best_epoch, result.best_val_nrmse = ck.get("best_epoch"), ck.get("best_val_nrmse")
        result.steps = ck.get("steps", 0)
        torch.set_rng_state(ck["torch_rng"].cpu())
        log.info("resumed from %s at epoch %d", ck_path, start_epoch)
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
                        _save(ckdir / f"best{suffix}", model, opt, epoch, result)
            result.history.append(rec)
            log.info("epoch %d: %s", epoch, rec)
            if ckdir is not None:
                _save(ckdir / f"last{suffix}", model, opt, epoch, result)
                last_good = (ckdir / f"last{suffix}", epoch)
    result.elapsed_s = time.perf_counter() - t0
    return result


def _save(path: Path, model, opt, epoch: int, result: TrainResult) -> None:
    """Write a checkpoint atomically (a temporary file renamed over ``path``); the format
    follows the suffix (``.pt``: ``torch.save``; ``.safetensors``: tensors + JSON metadata)."""
    ck = _checkpoint_state(model, opt, epoch, result)
    if path.suffix == ".safetensors":
        tmp = path.with_name(path.name + ".tmp")
        tensors, meta = _flatten(ck)
        _safetensors().save_file(tensors, str(tmp), metadata=meta)
    else:
        tmp = path.with_suffix(".tmp")
        torch.save(ck, tmp)
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
    "CHECKPOINT_FORMATS",
]
