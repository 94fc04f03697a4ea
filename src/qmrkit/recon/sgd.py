"""Reconstruction as a whole-image optimisation with a deep-learning optimiser (GACELLE's route).

``min_x  mean ρ(A x − y) + Σ_j λ_j R_j(x)`` with ρ an L1, L2 or Huber penalty on the complex
residual magnitude, minimised by Adam (or SGD with momentum / RMSProp) through autograd. The
optimiser table, the per-residual loss, the regulariser classes (:class:`qmrkit.fit.TotalVariation`,
:class:`qmrkit.fit.CustomRegularizer`, callables, ``(callable, weight)`` pairs) and the
plateau/learning-rate-halving stopping rule are those of the fitting engine
(:func:`qmrkit.fit.adam`); only the parameterisation differs (a complex image instead of bounded
model parameters).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .._progress import get_logger, progress_bar
from ..errors import ConvergenceWarning, ParameterError, ShapeError
from ..fit.adam import DEFAULT_LR, LOSSES, OPTIMIZERS, _voxel_loss
from ..fit.regularizers import RegularizerContext, as_regularizer
from ..ops import LinearOperator
from ._ops import to_complex
from .result import ReconResult

log = get_logger("recon.sgd")

#: names of the image views a regulariser may read (``ctx.maps`` in data units,
#: ``ctx.normalized`` divided by the image scale)
IMAGE_VIEWS = ("real", "imag", "magnitude")


def sgd(
    A: LinearOperator,
    y: Any,
    *,
    loss: str = "l2",
    regularizers: Sequence[Any] = (),
    optimizer: str = "adam",
    lr: float | None = None,
    max_iter: int = 500,
    x0: Any = None,
    convergence_value: float = 1e-5,
    convergence_window: int = 20,
    lr_decay: bool = True,
    min_lr_factor: float = 1e-3,
    huber_delta: float = 0.01,
    progress: bool | None = False,
) -> ReconResult:
    """Reconstruct ``x`` from ``y ≈ A x`` by gradient descent (Adam by default).

    Parameters
    ----------
    A : LinearOperator
        Encoding operator, e.g. ``Mask·FFT·Sense`` or a NUFFT with coil maps; ``A.ishape`` is the
        image shape.
    y : array ``(*batch, *A.oshape)``
        Measured data.
    loss : {"l1", "l2", "huber"}
        Penalty on ``|A x − y|`` per sample (GACELLE's default is L1: robust to outliers).
    regularizers : sequence
        :class:`qmrkit.fit.TotalVariation` naming image views ``"real"``, ``"imag"`` or
        ``"magnitude"`` (e.g. ``TotalVariation(("real", "imag"), 1e-3)``), or callables
        ``fn(views) -> scalar`` / ``(fn, weight)`` pairs. ``normalized`` views are divided by the
        image scale (99th percentile of ``|Aᴴy|/‖A‖²``), so weights do not depend on data units.
    optimizer : {"adam", "sgdm", "rmsprop"}
    lr : float, optional
        Initial learning rate in units of the image scale (default: the fitting engine's).
    max_iter : int
    x0 : array, optional
        Starting image (default: ``Aᴴy/‖A‖²``).
    convergence_value, convergence_window, lr_decay, min_lr_factor, huber_delta
        As in :func:`qmrkit.fit.adam` (plateau test on the loss; the learning rate halves at each
        plateau until ``min_lr_factor``).

    Returns
    -------
    ReconResult
        ``image`` the minimum-loss iterate; ``objective_history`` the loss per iteration.
    """
    from .. import optim

    if not isinstance(A, LinearOperator):
        raise ParameterError(f"A must be a qmrkit.ops.LinearOperator, got {type(A).__name__}")
    if loss not in LOSSES:
        raise ParameterError(f"loss must be one of {LOSSES}, got {loss!r}")
    if optimizer not in OPTIMIZERS:
        raise ParameterError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    if max_iter < 1:
        raise ParameterError(f"max_iter must be ≥ 1, got {max_iter}")
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    if not lr > 0:
        raise ParameterError(f"lr must be > 0, got {lr}")
    regs = [as_regularizer(r) for r in regularizers]
    for reg in regs:
        bad = [p for p in reg.params if p not in IMAGE_VIEWS]
        if bad:
            raise ParameterError(f"regulariser refers to {bad}; image views are {IMAGE_VIEWS}")
    t0 = time.perf_counter()
    yt = to_complex(y, "y")
    n_o = len(A.oshape)
    if yt.ndim < n_o or tuple(yt.shape[yt.ndim - n_o :]) != A.oshape:
        raise ShapeError(f"y must end in A's output shape {A.oshape}, got {tuple(yt.shape)}")
    lead = tuple(yt.shape[: yt.ndim - n_o])
    with torch.no_grad():
        l2 = float(optim.power_iteration(A, n_iter=20, dtype=yt.dtype, device=yt.device))
        start = A.H(yt) / l2
        mag = start.abs().reshape(-1)
        sx = float(mag.kthvalue(max(1, int(0.99 * mag.numel()))).values) or 1.0
        ymag = yt.abs().reshape(-1)
        sy = float(ymag.kthvalue(max(1, int(0.99 * ymag.numel()))).values) or 1.0
    u0 = start / sx if x0 is None else to_complex(x0, "x0", device=yt.device, dtype=yt.dtype) / sx
    u = torch.view_as_real(u0.clone()).contiguous().requires_grad_(True)
    opt_kwargs: dict[str, Any] = {"lr": lr}
    if optimizer == "sgdm":
        opt_kwargs["momentum"] = 0.9
    opt = OPTIMIZERS[optimizer]([u], **opt_kwargs)
    img_shape = (*lead, *A.ishape)
    mask = torch.ones(img_shape, dtype=torch.bool, device=yt.device)
    n_vox = int(mask.numel())
    yn = yt / sy
    history: list[float] = []
    best, best_u = float("inf"), u.detach().clone()
    converged, reason, it = False, "max_iter", 0
    with progress_bar(total=max_iter, desc=f"recon {optimizer}", progress=progress) as bar:
        for it in range(1, max_iter + 1):
            opt.zero_grad(set_to_none=True)
            x = torch.view_as_complex(u)
            r = (A(x * sx) / sy - yn).abs().reshape(-1, 1)
            total = _voxel_loss(r, loss, huber_delta).mean()
            if regs:
                views = {"real": x.real, "imag": x.imag, "magnitude": x.abs()}
                ctx = RegularizerContext(
                    maps={k: v * sx for k, v in views.items()},
                    normalized=views,
                    mask=mask,
                    n_voxels=n_vox,
                )
                for reg in regs:
                    total = total + reg(ctx)
            if not torch.isfinite(total):
                reason = "non-finite loss"
                warnings.warn(
                    "sgd: the loss became non-finite; returning the best iterate",
                    ConvergenceWarning,
                    stacklevel=2,
                )
                break
            total.backward()
            tv = float(total)
            history.append(tv)
            if tv < best:
                best, best_u = tv, u.detach().clone()
            opt.step()
            bar.update(1)
            w = convergence_window
            if len(history) >= 2 * w and it % w == 0:
                prev = sum(history[-2 * w : -w]) / w
                cur = sum(history[-w:]) / w
                if (prev - cur) / (w * max(abs(cur), 1e-30)) < convergence_value:
                    if lr_decay and opt.param_groups[0]["lr"] > lr * min_lr_factor * 1.0001:
                        for g in opt.param_groups:
                            g["lr"] = max(g["lr"] * 0.5, lr * min_lr_factor)
                    else:
                        converged, reason = True, "plateau"
                        break
    if not converged and reason == "max_iter":
        warnings.warn(
            f"sgd: stopped at max_iter={max_iter} before the loss plateaued",
            ConvergenceWarning,
            stacklevel=2,
        )
    img = torch.view_as_complex(best_u) * sx
    return ReconResult(
        img,
        "sgd",
        it,
        [],
        converged,
        time.perf_counter() - t0,
        {
            "loss": loss,
            "optimizer": optimizer,
            "lr": lr,
            "max_iter": max_iter,
            "stop_reason": reason,
            "image_scale": sx,
            "data_scale": sy,
            "regularizers": [type(r).__name__ for r in regs],
        },
        history,
        n_spatial=len(A.ishape),
    )
