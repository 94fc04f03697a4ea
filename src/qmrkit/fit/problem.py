"""A fitting problem: a model bound to masked, flattened, scaled data on one device.

Every solver (``lm``, ``adam``, ``dictionary_search``, ``mcmc``) starts from a :class:`Problem`, so
input validation, masking, non-finite handling and scaling happen once, in one place.

Internally parameters are a ``(V, P)`` tensor ``theta`` in *internal units*: amplitude parameters
divided by the data scale, the others in their physical units. Residuals are divided by the data
scale too, so tolerances and learning rates do not depend on the data's units.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._device import resolve_device
from ..errors import (
    BoundsError,
    DTypeError,
    NonFiniteWarning,
    ParameterError,
    ShapeError,
)
from .model import Model


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover
        raise DTypeError(f"{name}: cannot convert {type(x).__name__} to an array") from exc
    if arr.dtype == object or arr.dtype.kind not in "biufc":
        raise DTypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 0:  # ascontiguousarray would turn a scalar into shape (1,)
        return torch.tensor(arr.item())
    return torch.from_numpy(np.ascontiguousarray(arr))


def _quantile(x: torch.Tensor, q: float) -> float:
    """``torch.quantile(x, q)`` (linear interpolation) of a 1-D tensor by a selection instead of a
    full sort: the ``n − lo`` largest values hold both order statistics the interpolation needs
    (for the 99th percentile the top 1 %), ≈4× faster than two ``kthvalue`` selections and far
    faster than sorting, which matters on every solver call."""
    n = x.numel()
    pos = (n - 1) * q
    lo = math.floor(pos)
    top = torch.topk(x, n - lo, sorted=False).values  # order statistics lo+1 .. n
    two = torch.topk(top, min(2, top.numel()), largest=False).values  # ascending
    v_lo = two[0]
    v_hi = two[1] if two.numel() > 1 else v_lo
    return float(torch.lerp(v_lo, v_hi, torch.tensor(pos - lo, dtype=x.dtype, device=x.device)))


@dataclass
class Problem:
    """Masked, flattened, scaled data and a bound model (see module docs)."""

    model: Model
    data: torch.Tensor  # (V, M) internal units, real or complex
    weights: torch.Tensor | None  # (V, M) or None, non-negative
    inputs: dict[str, torch.Tensor]  # covariates, (V, 1)
    mask: torch.Tensor  # spatial bool: voxels fitted
    index: torch.Tensor  # (V,) flat indices of fitted voxels
    spatial_shape: tuple[int, ...]
    scale: float
    lower: torch.Tensor  # (P,) internal bounds
    upper: torch.Tensor
    n_nonfinite: int

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def n_voxels(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_meas(self) -> int:
        return int(self.data.shape[1])

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lower.dtype

    @property
    def amplitude_mask(self) -> torch.Tensor:
        return torch.tensor([p.amplitude for p in self.model.parameters], device=self.device)

    # -- evaluation ------------------------------------------------------------------------------
    def param_dict(
        self, theta: torch.Tensor, idx: torch.Tensor | slice | None = None
    ) -> dict[str, torch.Tensor]:
        """Internal ``theta (v, P)`` -> physical dict of ``(v, 1)`` columns plus covariates."""
        sel = slice(None) if idx is None else idx
        p: dict[str, torch.Tensor] = {}
        for j, par in enumerate(self.model.parameters):
            col = theta[:, j : j + 1]
            p[par.name] = col * self.scale if par.amplitude else col
        for k, v in self.inputs.items():
            p[k] = v[sel]
        return p

    def predict(self, theta: torch.Tensor, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Model signal in internal units, ``(v, M)``."""
        out = self.model.forward(self.param_dict(theta, idx))
        return out / self.scale

    def residual(
        self, theta: torch.Tensor, idx: torch.Tensor | slice | None = None
    ) -> torch.Tensor:
        """Weighted residual ``sqrt(w)·(f(θ) − d)`` in internal units, real ``(v, M or 2M)``."""
        sel = slice(None) if idx is None else idx
        r = self.predict(theta, idx) - self.data[sel]
        if self.weights is not None:
            r = r * self.weights[sel].sqrt()
        if r.is_complex():
            r = torch.view_as_real(r).flatten(-2)
        return r

    def model_jacobian_columns(
        self, theta: torch.Tensor, idx: torch.Tensor | slice | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """Residual ``(v, m)`` and the Jacobian's P columns (each ``(v, m)``, contiguous) from the
        model's own derivatives (:meth:`Model.jacobian`), in internal units; None if the model has
        none. Complex residuals come as (re, im) pairs, ``m = 2·n_meas``.

        Column by column because the solvers work per parameter: a column is a contiguous block
        (reductions over it run across rows), and no (v, m, P) copy is made."""
        with torch.no_grad():
            out = self.model.jacobian(self.param_dict(theta, idx))
        if out is None:
            return None
        sig, grads = out
        sel = slice(None) if idx is None else idx
        r = sig / self.scale - self.data[sel]
        # internal θ: amplitudes are value/scale, the residual is signal/scale
        cols = [
            (grads[par.name] if par.amplitude else grads[par.name] / self.scale).expand_as(sig)
            for par in self.model.parameters
        ]
        if self.weights is not None:
            sw = self.weights[sel].sqrt()
            r = r * sw
            cols = [c * sw for c in cols]
        if r.is_complex():
            r = torch.view_as_real(r).flatten(-2)
            cols = [torch.view_as_real(c.contiguous()).flatten(-2) for c in cols]
        return r, [c.contiguous() for c in cols]

    def model_jacobian(
        self, theta: torch.Tensor, idx: torch.Tensor | slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Residual ``(v, m)`` and Jacobian ``(v, m, P)`` from the model's own derivatives
        (:meth:`model_jacobian_columns` stacked), in internal units; None if the model has none."""
        out = self.model_jacobian_columns(theta, idx)
        if out is None:
            return None
        r, cols = out
        # (v, m, P) as a view of (v, P, m) storage: stacking whole columns is a contiguous copy
        # (stacking along a new last axis is a strided scatter, several times slower), and each
        # parameter's column stays contiguous for the solvers' per-parameter reductions
        return r, torch.stack(cols, dim=1).transpose(1, 2)

    # -- conversions -----------------------------------------------------------------------------
    def to_physical(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Internal ``(V, P)`` -> dict ``name -> (V,)`` in physical units."""
        return {
            k: v[:, 0] for k, v in self.param_dict(theta).items() if k in self.model.parameter_names
        }

    def from_physical(self, values: Mapping[str, Any], *, spatial: bool) -> torch.Tensor:
        """Physical values (maps in image shape if ``spatial``, else ``(V,)``) -> internal theta."""
        cols = []
        for par in self.model.parameters:
            if par.name not in values:
                raise ParameterError(
                    f"initial values lack parameter {par.name!r}; give all of {self.model.parameter_names}"
                )
            v = _to_tensor(values[par.name], f"init[{par.name!r}]").to(self.device, self.dtype)
            if spatial:
                if v.ndim == 0:
                    v = v.expand(self.n_voxels)
                elif tuple(v.shape) != self.spatial_shape:
                    raise ShapeError(
                        f"initial map {par.name!r} has shape {tuple(v.shape)}; expected the image "
                        f"shape {self.spatial_shape}"
                    )
                else:
                    v = v.reshape(-1)[self.index]
            cols.append(v / self.scale if par.amplitude else v)
        return torch.stack(cols, dim=1)

    def clamp(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(theta, self.upper), self.lower)

    def to_map(self, values: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
        """Scatter per-voxel values ``(V, ...)`` into the image grid ``(*spatial, ...)``."""
        tail = tuple(values.shape[1:])
        n = math.prod(self.spatial_shape)
        if values.dtype == torch.bool:
            out = torch.zeros((n, *tail), dtype=torch.bool, device=values.device)
        else:
            out = torch.full((n, *tail), fill, dtype=values.dtype, device=values.device)
        out[self.index] = values
        return out.reshape(*self.spatial_shape, *tail)

    def subset(self, idx: torch.Tensor) -> Problem:
        """The same problem restricted to fitted voxels ``idx`` (for chunking)."""
        return Problem(
            model=self.model,
            data=self.data[idx],
            weights=None if self.weights is None else self.weights[idx],
            inputs={k: v[idx] for k, v in self.inputs.items()},
            mask=self.mask,
            index=self.index[idx],
            spatial_shape=self.spatial_shape,
            scale=self.scale,
            lower=self.lower,
            upper=self.upper,
            n_nonfinite=self.n_nonfinite,
        )


def make_problem(
    model: Model,
    data: Any,
    *,
    mask: Any = None,
    weights: Any = None,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    need_finite_bounds: bool = False,
    solver: str = "fit",
) -> Problem:
    """Validate and prepare ``data`` of shape ``(*spatial, n_meas)`` for fitting ``model``.

    Raises :class:`ShapeError` for mismatched shapes, :class:`BoundsError` for infinite bounds where
    the solver needs finite ones, and warns (:class:`NonFiniteWarning`) with a count when voxels with
    NaN/Inf are excluded.
    """
    if not isinstance(model, Model):
        raise ParameterError(
            f"{solver}: expected a qmrkit.fit.Model, got {type(model).__name__}; build one with "
            "qmrkit.fit.model_from_function or qmrkit.models.get(name, ...)"
        )
    if dtype not in (torch.float32, torch.float64):
        raise DTypeError(f"{solver}: dtype must be torch.float32 or torch.float64, got {dtype}")
    d = _to_tensor(data, "data")
    dev = resolve_device(device, d)
    if d.ndim < 1:
        raise ShapeError(f"{solver}: data must have shape (*spatial, n_meas), got a scalar")
    if d.dtype == torch.bool or not (d.is_floating_point() or d.is_complex()):
        d = d.to(torch.float64)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    d = d.to(device=dev, dtype=cdtype if d.is_complex() else dtype)
    m = model.to(dev, dtype)
    n_model = m.n_measurements
    if d.shape[-1] != n_model:
        raise ShapeError(
            f"{solver}: the image series has {d.shape[-1]} measurements (last axis of data shape "
            f"{tuple(d.shape)}) but the {m.name} model has {n_model} {m.measurement_axis}; the series "
            "must have the measurement axis last and one entry per acquisition setting"
        )
    spatial = tuple(d.shape[:-1])
    flat = d.reshape(-1, n_model)

    if mask is None:
        msk = torch.ones(spatial, dtype=torch.bool, device=dev)
    else:
        msk = _to_tensor(mask, "mask").to(dev)
        if tuple(msk.shape) != spatial:
            raise ShapeError(
                f"{solver}: mask has shape {tuple(msk.shape)} but the data's image shape is {spatial} "
                f"(data shape {tuple(d.shape)})"
            )
        msk = msk != 0
    w = None
    if weights is not None:
        wt = _to_tensor(weights, "weights").to(device=dev, dtype=dtype)
        if tuple(wt.shape) == spatial:
            wt = wt[..., None].expand(*spatial, n_model)
        elif tuple(wt.shape) != tuple(d.shape):
            raise ShapeError(
                f"{solver}: weights must have the image shape {spatial} or the data shape "
                f"{tuple(d.shape)}, got {tuple(wt.shape)}"
            )
        if (wt < 0).any():
            raise ParameterError(f"{solver}: weights must be non-negative")
        w = wt.reshape(-1, n_model)

    finite = torch.isfinite(flat).all(dim=-1)
    if w is not None:
        finite &= torch.isfinite(w).all(dim=-1)
    inputs_full: dict[str, torch.Tensor] = {}
    for name in m.covariates:
        v = m.covariate_maps.get(name, 1.0)
        t = torch.as_tensor(v, dtype=dtype).to(dev)
        if t.ndim == 0:
            t = t.expand(spatial)
        elif tuple(t.shape) != spatial:
            raise ShapeError(
                f"{solver}: per-voxel input {name!r} has shape {tuple(t.shape)} but the data's image "
                f"shape is {spatial}"
            )
        t = t.reshape(-1)
        finite &= torch.isfinite(t)
        inputs_full[name] = t
    sel = msk.reshape(-1)
    n_bad = int((sel & ~finite).sum())
    if n_bad:
        warnings.warn(
            f"{solver}: {n_bad} voxel(s) inside the mask contain NaN or Inf (in the data, weights or "
            "per-voxel inputs) and were excluded from the fit",
            NonFiniteWarning,
            stacklevel=3,
        )
    sel = sel & finite
    index = torch.nonzero(sel).reshape(-1)
    if index.numel() == 0:
        raise ShapeError(
            f"{solver}: no voxel to fit (the mask is empty or every voxel is non-finite)"
        )
    dv = flat[index]
    mags = dv.abs().reshape(-1)
    # the 99th percentile of a strided subsample of at most ~65k values: robust and cheap (a
    # selection over all 131k values of a 128² × 8 series took 1 ms, a quarter of a warm fit's
    # overhead outside the solver)
    stride = max(1, mags.numel() // 65_536)
    scale = _quantile(mags[::stride].to(torch.float64), 0.99)
    if not scale > 0:
        scale = float(dv.abs().max())
    if not scale > 0:
        raise ParameterError(f"{solver}: the data are all zero inside the mask; nothing to fit")

    lo, hi = [], []
    for p in m.parameters:
        if need_finite_bounds and not p.finite:
            raise BoundsError(
                f"{solver}: parameter {p.name!r} has infinite bounds [{p.lower}, {p.upper}]; this "
                "solver maps parameters between finite bounds, so give finite ones"
            )
        lo.append(p.lower)
        hi.append(p.upper)
    return Problem(
        model=m,
        data=dv / scale,
        weights=None if w is None else w[index],
        inputs={k: v[index][:, None] for k, v in inputs_full.items()},
        mask=msk,
        index=index,
        spatial_shape=spatial,
        scale=scale,
        lower=torch.tensor(lo, dtype=dtype, device=dev),
        upper=torch.tensor(hi, dtype=dtype, device=dev),
        n_nonfinite=n_bad,
    )
