"""Neural-network surrogates of expensive simulators, usable as (part of) a forward model.

A simulator ``sim(params, **acquisition) -> signal`` with no closed form (EPG-X, Monte Carlo, ...)
is too slow to call inside every solver iteration. :func:`train_surrogate` samples its inputs over
given ranges (scrambled Sobol or uniform, optionally log-uniform per input), simulates once, and
fits a small multi-layer perceptron to the outputs:

* inputs are mapped linearly (or logarithmically) from their range to [−1, 1]; outputs are
  standardised per output (mean 0, std 1 over the training set), so every output weighs alike;
* Adam on the mean squared error of the standardised outputs, full-data epochs in minibatches,
  learning rate halved on validation plateaus, early stopping on the validation loss (the best
  weights are kept);
* a held-out test set, never seen in training, gives the reported error: per sample
  ``max_j |ŷ_j − y_j| / max_j |y_j|`` (error relative to the sample's peak signal, so outputs that
  cross zero do not inflate it), summarised as max / 99th percentile / median.

The network is smooth (SiLU activations by default), so autograd gives the derivatives every solver
needs (forward mode for :func:`~qmrkit.fit.lm`, reverse mode for :func:`~qmrkit.fit.adam` and the
MCMC samplers). A :class:`Surrogate` is a ``torch.nn.Module`` that is called with a dict of
``(V, 1)`` columns, so it drops into any :meth:`Model.forward`; :class:`SurrogateModel` wraps one
as a complete :class:`~qmrkit.fit.Model` (plus an optional amplitude).

Files: :meth:`Surrogate.save` writes a ``.safetensors`` file (weights, normalisation tensors) with
the ranges, layer sizes, activation, acquisition and test-set report as JSON metadata; nothing is
unpickled on :meth:`Surrogate.load`. (This module lives in the solver layer, so it does not import
:mod:`qmrkit.learn`; it uses the same ``safetensors`` optional dependency and conventions.)

Nothing here knows MRI physics.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._optional import require
from .._progress import get_logger, progress_bar
from ..errors import ConvergenceWarning, DataFileError, ModelError, ParameterError, ShapeError
from .model import Model, Parameter

log = get_logger("fit.surrogate")

_FORMAT = "qmrkit.fit.surrogate"
_ACTIVATIONS: dict[str, Callable[[], torch.nn.Module]] = {
    "silu": torch.nn.SiLU,
    "tanh": torch.nn.Tanh,
    "gelu": torch.nn.GELU,
    "softplus": torch.nn.Softplus,
}

__all__ = ["Surrogate", "SurrogateReport", "SurrogateModel", "train_surrogate", "sample_inputs"]


@dataclass(frozen=True)
class InputRange:
    """Training range of one surrogate input (physical units)."""

    name: str
    lower: float
    upper: float
    log: bool = False
    unit: str = ""


def _parse_ranges(ranges: Mapping[str, Any]) -> list[InputRange]:
    if not ranges:
        raise ParameterError("ranges must name at least one input: {name: (lower, upper)}")
    out = []
    for name, spec in ranges.items():
        if isinstance(spec, InputRange):
            out.append(spec)
            continue
        seq = list(spec)
        if len(seq) not in (2, 3, 4):
            raise ParameterError(
                f"range of {name!r} must be (lower, upper[, 'log' | 'lin'[, unit]]), got {spec!r}"
            )
        lo, hi = float(seq[0]), float(seq[1])
        scale = seq[2] if len(seq) > 2 else "lin"
        if scale not in ("lin", "log"):
            raise ParameterError(f"range of {name!r}: scale must be 'lin' or 'log', got {scale!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ParameterError(f"range of {name!r} must be finite with lower < upper, got {spec}")
        if scale == "log" and lo <= 0:
            raise ParameterError(f"range of {name!r}: a log range needs lower > 0, got {lo}")
        out.append(InputRange(name, lo, hi, scale == "log", str(seq[3]) if len(seq) > 3 else ""))
    return out


def sample_inputs(
    ranges: Mapping[str, Any], n: int, *, method: str = "sobol", seed: int = 0
) -> dict[str, torch.Tensor]:
    """``n`` input sets over ``ranges`` (dict name -> ``(lower, upper[, 'log'])``), float64 ``(n,)``.

    ``method="sobol"``: scrambled Sobol points (even coverage; best with ``n`` a power of two);
    ``"uniform"``: independent uniform draws. Log ranges are sampled uniformly in log space.
    """
    rs = _parse_ranges(ranges)
    if n < 1:
        raise ParameterError(f"n must be >= 1, got {n}")
    if method == "sobol":
        eng = torch.quasirandom.SobolEngine(len(rs), scramble=True, seed=seed)
        u = eng.draw(n, dtype=torch.float64)
    elif method == "uniform":
        g = torch.Generator().manual_seed(seed)
        u = torch.rand((n, len(rs)), generator=g, dtype=torch.float64)
    else:
        raise ParameterError(f"method must be 'sobol' or 'uniform', got {method!r}")
    out = {}
    for j, r in enumerate(rs):
        if r.log:
            out[r.name] = torch.exp(
                math.log(r.lower) + u[:, j] * (math.log(r.upper) - math.log(r.lower))
            )
        else:
            out[r.name] = r.lower + u[:, j] * (r.upper - r.lower)
    return out


@dataclass
class SurrogateReport:
    """Training summary and held-out error (relative errors as fractions, not %)."""

    n_train: int
    n_val: int
    n_test: int
    epochs: int
    best_epoch: int
    stopped: str
    max_rel_error: float
    p99_rel_error: float
    median_rel_error: float
    rmse: float
    sim_seconds: float
    train_seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (train, val) per epoch

    def summary(self) -> str:
        return (
            f"surrogate: {self.n_train} train / {self.n_test} held-out samples, {self.epochs} "
            f"epochs ({self.stopped}); held-out error relative to peak signal: max "
            f"{100 * self.max_rel_error:.3f} %, p99 {100 * self.p99_rel_error:.3f} %, median "
            f"{100 * self.median_rel_error:.3f} %"
        )


class Surrogate(torch.nn.Module):
    """An MLP from named physical inputs to a signal vector, with its normalisation built in.

    Call it with a dict ``name -> (V, 1)`` (or ``(V,)``) tensor, or :meth:`evaluate` with a
    ``(V, n_in)`` tensor in the order of :attr:`input_names`; either returns ``(V, n_out)``.
    Inputs outside the training ranges are evaluated (no clamping) but are extrapolation.

    Parameters
    ----------
    ranges : dict
        ``name -> (lower, upper[, 'log'|'lin'[, unit]])`` (physical units).
    n_out : int
        Length of the signal vector.
    hidden : sequence of int
        Widths of the hidden layers.
    activation : {"silu", "tanh", "gelu", "softplus"}
        Hidden activation (smooth, so Jacobians are continuous).
    out_mean, out_std : Tensor (n_out,), optional
        Output standardisation (default 0 and 1).
    acquisition : dict, optional
        The fixed simulator settings the surrogate was trained for (JSON-able, kept as metadata).
    """

    def __init__(
        self,
        ranges: Mapping[str, Any],
        n_out: int,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str = "silu",
        out_mean: torch.Tensor | None = None,
        out_std: torch.Tensor | None = None,
        acquisition: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ParameterError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        if n_out < 1 or any(int(h) < 1 for h in hidden):
            raise ParameterError(f"n_out and hidden widths must be >= 1, got {n_out}, {hidden}")
        self.ranges = _parse_ranges(ranges)
        self.n_out = int(n_out)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.acquisition = dict(acquisition or {})
        self.report: SurrogateReport | None = None
        layers: list[torch.nn.Module] = []
        width = len(self.ranges)
        for h in self.hidden:
            layers += [torch.nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        layers.append(torch.nn.Linear(width, self.n_out))
        self.net = torch.nn.Sequential(*layers)
        lo = [math.log(r.lower) if r.log else r.lower for r in self.ranges]
        hi = [math.log(r.upper) if r.log else r.upper for r in self.ranges]
        self.register_buffer("in_lo", torch.tensor(lo))
        self.register_buffer("in_hi", torch.tensor(hi))
        self.register_buffer(
            "out_mean", torch.zeros(self.n_out) if out_mean is None else out_mean.clone().float()
        )
        self.register_buffer(
            "out_std", torch.ones(self.n_out) if out_std is None else out_std.clone().float()
        )
        self._casts: dict[tuple[torch.device, torch.dtype], Surrogate] = {}

    # -- description -----------------------------------------------------------------------------
    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.ranges)

    def input_range(self, name: str) -> InputRange:
        for r in self.ranges:
            if r.name == name:
                return r
        raise ParameterError(f"surrogate has no input {name!r}; inputs are {self.input_names}")

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    # -- evaluation ------------------------------------------------------------------------------
    def normalize_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Physical ``(V, n_in)`` -> network inputs in [−1, 1] over the training ranges."""
        lo, hi = self.in_lo.to(x.dtype), self.in_hi.to(x.dtype)
        # log only the log-scaled columns (torch.where would evaluate log of every column and
        # poison gradients of non-positive linear inputs with NaN)
        cols = [torch.log(x[:, j]) if bool(r.log) else x[:, j] for j, r in enumerate(self.ranges)]
        z = torch.stack(cols, dim=-1)
        return 2 * (z - lo) / (hi - lo) - 1

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Signal ``(V, n_out)`` for physical inputs ``x (V, n_in)`` (order of input_names)."""
        if x.ndim != 2 or x.shape[1] != len(self.ranges):
            raise ShapeError(
                f"surrogate inputs must be (V, {len(self.ranges)}) in the order "
                f"{self.input_names}, got {tuple(x.shape)}"
            )
        net = self._cast(x.device, x.dtype)
        y = net.net(net.normalize_inputs(x))
        return y * net.out_std + net.out_mean

    def forward(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """Signal ``(V, n_out)`` for a dict of physical inputs, each ``(V, 1)`` or ``(V,)``."""
        missing = [n for n in self.input_names if n not in params]
        if missing:
            raise ParameterError(
                f"surrogate needs inputs {list(self.input_names)}; missing {missing}"
            )
        cols = [params[n].reshape(params[n].shape[0], -1)[:, :1] for n in self.input_names]
        return self.evaluate(torch.cat(cols, dim=-1))

    def _cast(self, device: torch.device, dtype: torch.dtype) -> Surrogate:
        """This network on ``device`` in ``dtype``; a cached copy (no grad through the weights)
        when that differs from where the weights live, so a float32-trained surrogate serves a
        float64 fit without touching the original."""
        p = self.in_lo
        if p.device == device and p.dtype == dtype:
            return self
        key = (device, dtype)
        hit = self._casts.get(key)
        if hit is None:
            hit = copy.deepcopy(self)
            hit._casts = {}
            hit.to(device=device, dtype=dtype)
            for q in hit.parameters():
                q.requires_grad_(False)
            self._casts[key] = hit
        return hit

    def _apply(self, fn, recurse=True):  # moving the module invalidates cached copies
        self._casts = {}
        return super()._apply(fn, recurse)

    # -- files -----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": 1,
            "ranges": [asdict(r) for r in self.ranges],
            "n_out": self.n_out,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "acquisition": self.acquisition,
            "report": None if self.report is None else asdict(self.report),
        }

    def save(self, path: str | Path) -> Path:
        """Write weights and normalisation (float32 tensors) plus JSON metadata (ranges, layer
        sizes, activation, acquisition, report) to a ``.safetensors`` file."""
        st = _safetensors()
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        st.save_file(tensors, str(path), metadata={"qmrkit": json.dumps(self.config())})
        return path

    @classmethod
    def load(cls, path: str | Path, device: Any = None) -> Surrogate:
        """Read a file written by :meth:`save` (tensors and JSON only; nothing is unpickled)."""
        _safetensors()
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise DataFileError(f"surrogate file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise DataFileError(f"{path} is not a readable safetensors file: {exc}") from exc
        try:
            cfg = json.loads(meta["qmrkit"])
            assert cfg["format"] == _FORMAT
        except Exception as exc:
            raise DataFileError(
                f"{path} is a safetensors file without qmrkit surrogate metadata "
                f"(expected metadata['qmrkit'] with format {_FORMAT!r})"
            ) from exc
        ranges = {
            r["name"]: (r["lower"], r["upper"], "log" if r["log"] else "lin", r.get("unit", ""))
            for r in cfg["ranges"]
        }
        obj = cls(ranges, cfg["n_out"], cfg["hidden"], cfg["activation"], None, None,
                  cfg.get("acquisition"))  # fmt: skip
        obj.load_state_dict(tensors)
        if cfg.get("report"):
            rep = dict(cfg["report"])
            rep["history"] = [tuple(h) for h in rep.get("history", [])]
            obj.report = SurrogateReport(**rep)
        if device is not None:
            obj.to(device)
        return obj


def _safetensors():
    require("safetensors")
    import safetensors.torch

    return safetensors.torch


def _simulate(
    sim: Callable[..., Any],
    inputs: dict[str, torch.Tensor],
    acquisition: Mapping[str, Any],
    sim_batch: int,
) -> torch.Tensor:
    n = next(iter(inputs.values())).numel()
    outs = []
    for i0 in range(0, n, sim_batch):
        part = {k: v[i0 : i0 + sim_batch] for k, v in inputs.items()}
        y = sim(part, **acquisition)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        m = next(iter(part.values())).numel()
        if y.is_complex():
            raise ModelError(
                "surrogate simulators must return real signals (stack real and imaginary parts "
                "as separate outputs)"
            )
        if y.ndim == 1 and m > 1 and y.shape[0] == m:
            y = y[:, None]
        if y.ndim != 2 or y.shape[0] != m:
            raise ShapeError(
                f"sim must return (n, n_out) for n = {m} input sets, got {tuple(y.shape)}"
            )
        outs.append(y.detach().to(torch.float64).cpu())
    y = torch.cat(outs)
    if not torch.isfinite(y).all():
        raise ModelError("the simulator returned NaN or Inf inside the training ranges")
    return y


def _rel_errors(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    peak = ref.abs().amax(dim=1).clamp_min(torch.finfo(ref.dtype).tiny)
    return (pred - ref).abs().amax(dim=1) / peak


def train_surrogate(
    sim: Callable[..., Any],
    ranges: Mapping[str, Any],
    *,
    acquisition: Mapping[str, Any] | None = None,
    n_train: int = 4096,
    n_val: int = 512,
    n_test: int = 1024,
    sampling: str = "sobol",
    hidden: Sequence[int] = (64, 64, 64),
    activation: str = "silu",
    max_epochs: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-3,
    patience: int = 60,
    min_lr: float = 1e-5,
    target: float | None = None,
    seed: int = 0,
    sim_batch: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
    threads: int | None = None,
    progress: bool | None = None,
) -> Surrogate:
    """Train an MLP surrogate of ``sim`` over ``ranges``.

    Parameters
    ----------
    sim : callable
        ``sim(params, **acquisition) -> (n, n_out)`` real signals, where ``params`` is a dict
        ``name -> float64 tensor (n,)`` with the names of ``ranges``.
    ranges : dict
        ``name -> (lower, upper)`` or ``(lower, upper, 'log')`` in physical units (log: sampled
        and normalised in log space, for inputs spanning decades).
    acquisition : dict, optional
        Fixed simulator settings passed to ``sim`` by keyword; stored in the file (JSON-able).
    n_train, n_val, n_test : int
        Samples for training, early stopping and the held-out report (independent draws: the
        validation and test sets come from differently seeded generators).
    sampling : {"sobol", "uniform"}
        How training inputs are drawn (validation/test sets are always uniform random).
    hidden, activation
        Network shape (see :class:`Surrogate`).
    max_epochs, batch_size, lr, patience, min_lr
        Adam on minibatches; the learning rate halves after ``patience // 3`` epochs without a
        validation improvement; training stops after ``patience`` epochs without one, when the
        learning rate falls below ``min_lr``, or at ``max_epochs``. The best weights are kept.
    target : float, optional
        Required held-out max relative error (fraction, e.g. 0.005); a
        :class:`~qmrkit.errors.ConvergenceWarning` is issued when it is not met.
    seed : int
        Seeds sampling, initialisation and minibatch order (reproducible on one device).
    sim_batch : int
        Input sets per simulator call.
    dtype, device
        Training precision and device (the simulator decides its own).
    threads : int, optional
        CPU threads for the training loop (restored afterwards; default: torch's setting). The
        matrices of a small MLP are tiny, so ``threads=1`` is often faster on a busy machine,
        where synchronising intra-op threads costs more than it saves.
    progress : bool, optional
        Progress bar over epochs (None: on a terminal).

    Returns
    -------
    Surrogate
        The trained network, with ``.report`` (:class:`SurrogateReport`).
    """
    rs = _parse_ranges(ranges)
    acq = dict(acquisition or {})
    for n, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if int(v) < 1:
            raise ParameterError(f"{n} must be >= 1, got {v}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if batch_size < 1 or max_epochs < 1 or patience < 1 or not lr > 0:
        raise ParameterError(
            f"batch_size, max_epochs and patience must be >= 1 and lr > 0; got {batch_size}, "
            f"{max_epochs}, {patience}, {lr}"
        )
    t0 = time.perf_counter()
    x_tr = sample_inputs(ranges, n_train, method=sampling, seed=seed)
    x_va = sample_inputs(ranges, n_val, method="uniform", seed=seed + 1_000_003)
    x_te = sample_inputs(ranges, n_test, method="uniform", seed=seed + 2_000_029)
    y_tr = _simulate(sim, x_tr, acq, sim_batch)
    y_va = _simulate(sim, x_va, acq, sim_batch)
    y_te = _simulate(sim, x_te, acq, sim_batch)
    t_sim = time.perf_counter() - t0

    def stack(x):
        return torch.stack([x[r.name] for r in rs], dim=-1)

    mean = y_tr.mean(0)
    # a constant output gets unit scale (it is learned exactly by the bias)
    std = y_tr.std(0)
    std = torch.where(std > 1e-12 * (y_tr.abs().max() + 1e-300), std, torch.ones_like(std))
    torch.manual_seed(seed)
    model = Surrogate(ranges, y_tr.shape[1], hidden, activation, mean, std, acq)
    model.to(device=dev, dtype=dtype)
    Xtr = model.normalize_inputs(stack(x_tr).to(dev, dtype))
    Xva = model.normalize_inputs(stack(x_va).to(dev, dtype))
    Ytr = ((y_tr - mean) / std).to(dev, dtype)
    Yva = ((y_va - mean) / std).to(dev, dtype)
    t1 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        history, best_epoch, epoch, stopped = _fit(
            model, Xtr, Ytr, Xva, Yva, max_epochs, batch_size, lr, patience, min_lr, seed, progress
        )
    finally:
        torch.set_num_threads(old_threads)
    t_train = time.perf_counter() - t1
    with torch.no_grad():
        pred = model.evaluate(stack(x_te).to(dev, dtype)).to(torch.float64).cpu()
    rel = _rel_errors(pred, y_te)
    model.report = SurrogateReport(
        n_train=int(n_train),
        n_val=int(n_val),
        n_test=int(n_test),
        epochs=epoch,
        best_epoch=best_epoch,
        stopped=stopped,
        max_rel_error=float(rel.max()),
        p99_rel_error=float(torch.quantile(rel, 0.99)),
        median_rel_error=float(rel.median()),
        rmse=float(torch.sqrt(torch.mean((pred - y_te) ** 2))),
        sim_seconds=t_sim,
        train_seconds=t_train,
        history=history,
    )
    log.info(model.report.summary())
    if target is not None and model.report.max_rel_error > target:
        warnings.warn(
            f"surrogate held-out max relative error {model.report.max_rel_error:.3g} exceeds the "
            f"target {target:g}; train longer, on more samples, or with a wider network",
            ConvergenceWarning,
            stacklevel=2,
        )
    return model


def _fit(model, Xtr, Ytr, Xva, Yva, max_epochs, batch_size, lr, patience, min_lr, seed, progress):
    """Adam with plateau halving and early stopping; leaves the best weights in ``model``."""
    n_train = Xtr.shape[0]
    dev = Xtr.device
    opt = torch.optim.Adam(model.net.parameters(), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best, best_state, best_epoch, since = math.inf, None, 0, 0
    history: list[tuple[float, float]] = []
    stopped = "max_epochs"
    bar = progress_bar(total=max_epochs, desc="surrogate", progress=progress, unit="epoch")
    epoch = 0
    with bar:
        for epoch in range(1, max_epochs + 1):
            model.train()
            perm = torch.randperm(n_train, generator=gen).to(dev)
            tot = 0.0
            for i0 in range(0, n_train, batch_size):
                idx = perm[i0 : i0 + batch_size]
                loss = torch.mean((model.net(Xtr[idx]) - Ytr[idx]) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * idx.numel()
            with torch.no_grad():
                val = float(torch.mean((model.net(Xva) - Yva) ** 2))
            history.append((tot / n_train, val))
            bar.update(1)
            bar.set_postfix(val=f"{val:.2e}", refresh=False)
            if not math.isfinite(val):
                stopped = "non-finite validation loss"
                break
            if val < best * (1 - 1e-4):
                best, best_epoch, since = val, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
            else:
                since += 1
                if since % max(1, patience // 3) == 0:
                    for g in opt.param_groups:
                        g["lr"] *= 0.5
                if since >= patience:
                    stopped = "early stopping (validation loss)"
                    break
            if opt.param_groups[0]["lr"] < min_lr:
                stopped = "learning rate below min_lr"
                break
    if best_state is not None:
        model.net.load_state_dict(best_state)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return history, best_epoch, epoch, stopped


class SurrogateModel(Model):
    """A :class:`~qmrkit.fit.Model` whose signal is a :class:`Surrogate` (optionally scaled).

    Every surrogate input becomes a fitted parameter bounded by its training range (a surrogate
    does not extrapolate), unless it is held fixed (``fixed``) or read per voxel (``covariates``,
    e.g. a B1 map).

    Parameters
    ----------
    surrogate : Surrogate
    amplitude : str or None
        Name of an amplitude parameter multiplying the signal (e.g. ``"S0"``; bounds 0–100 × the
        data scale), or None to fit the surrogate's output as it is.
    fixed : dict, optional
        Inputs held at constant values (physical units).
    covariates : sequence of str
        Inputs read from per-voxel maps (``covariate_maps``), default 1.0 when not given.
    covariate_maps : dict, optional
        ``name -> map`` (spatial shape) or scalar.
    name : str
    """

    measurement_axis = "surrogate outputs"

    def __init__(
        self,
        surrogate: Surrogate,
        *,
        amplitude: str | None = "S0",
        fixed: Mapping[str, float] | None = None,
        covariates: Sequence[str] = (),
        covariate_maps: Mapping[str, Any] | None = None,
        name: str = "surrogate",
    ):
        if not isinstance(surrogate, Surrogate):
            raise ModelError(f"SurrogateModel needs a Surrogate, got {type(surrogate).__name__}")
        self.surrogate = surrogate
        self.fixed = {k: float(v) for k, v in (fixed or {}).items()}
        for k in (*self.fixed, *covariates):
            surrogate.input_range(k)  # raises naming the inputs
        self.name = name
        self.covariates = tuple(covariates)
        params = [
            Parameter(r.name, r.lower, r.upper, r.unit, log_scale=r.log)
            for r in surrogate.ranges
            if r.name not in self.fixed and r.name not in self.covariates
        ]
        if amplitude is not None:
            params.insert(0, Parameter(amplitude, 0.0, 100.0, "a.u.", amplitude=True))
        self.parameters = tuple(params)
        self.amplitude = amplitude
        super().__init__(covariate_maps=covariate_maps)

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        v = next(iter(p.values())).shape[0]
        ref = next(t for t in p.values())
        cols = {}
        for n in self.surrogate.input_names:
            if n in self.fixed:
                cols[n] = torch.full((v, 1), self.fixed[n], dtype=ref.dtype, device=ref.device)
            else:
                cols[n] = p[n]
        out = self.surrogate(cols)
        if self.amplitude is not None:
            out = p[self.amplitude] * out
        return out
