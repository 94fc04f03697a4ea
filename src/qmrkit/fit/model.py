"""Signal models: named, bounded parameters and a PyTorch forward function.

A :class:`Model` knows the physics; the solvers in :mod:`qmrkit.fit` know none. Conventions:

* ``forward(p)`` receives a dict ``name -> tensor of shape (V, 1)`` (one column per voxel, so that
  acquisition vectors of shape ``(n_meas,)`` broadcast) and returns the signal ``(V, n_meas)``.
  Per-voxel inputs ("covariates", e.g. a B1 map) arrive in the same dict, also as ``(V, 1)``.
* Acquisition settings (TI, TE, flip angles, ...) are bound at construction and live on the CPU in
  float64; :meth:`Model.to` returns a copy bound to a device and dtype.
* *Amplitude* parameters (M0, S0, ...) scale the signal. Their bounds are written relative to the
  data scale (the 99th percentile of |data| inside the mask), so one model works on data of any
  scale; their fitted values are returned in data units.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import BoundsError, ModelError, ParameterError, ShapeError


@dataclass(frozen=True)
class Parameter:
    """One model parameter.

    Parameters
    ----------
    name : str
        Name used in dicts, maps and file names (``"T1"``, ``"M0"``).
    lower, upper : float
        Bounds. For amplitude parameters they are multiples of the data scale. Infinite bounds are
        allowed for ``lm``; ``adam`` and dictionary starts need finite ones.
    unit : str
        Unit, e.g. ``"ms"``, ``"1/s"``, ``"a.u."``.
    start : float, optional
        A typical value, used when no better start is known.
    amplitude : bool
        True for parameters that scale the signal (see module docs).
    log_scale : bool
        Sample the parameter log-uniformly in dictionary starts (for quantities spanning decades).
    description : str
        Human-readable meaning.
    """

    name: str
    lower: float
    upper: float
    unit: str = ""
    start: float | None = None
    amplitude: bool = False
    log_scale: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ParameterError(f"parameter name {self.name!r} must be a valid identifier")
        lo, hi = float(self.lower), float(self.upper)
        if math.isnan(lo) or math.isnan(hi) or not lo < hi:
            raise BoundsError(
                f"parameter {self.name!r}: lower bound must be < upper bound, got "
                f"lower={self.lower}, upper={self.upper}"
            )
        if self.start is not None and not lo <= self.start <= hi:
            raise BoundsError(
                f"parameter {self.name!r}: start {self.start} is outside its bounds [{lo}, {hi}]"
            )
        if self.log_scale and lo <= 0:
            raise BoundsError(f"parameter {self.name!r}: log_scale needs a positive lower bound")

    @property
    def finite(self) -> bool:
        return math.isfinite(self.lower) and math.isfinite(self.upper)

    def typical(self) -> float:
        """A sensible value inside the bounds (start, else a geometric/arithmetic centre)."""
        if self.start is not None:
            return float(self.start)
        lo, hi = self.lower, self.upper
        if self.finite:
            if self.log_scale:
                return math.sqrt(lo * hi)
            return 0.5 * (lo + hi)
        if math.isfinite(lo):
            return lo + 1.0
        if math.isfinite(hi):
            return hi - 1.0
        return 0.0


def _as_float64(name: str, value: Any) -> torch.Tensor:
    arr = np.asarray(value, dtype=np.float64) if not isinstance(value, torch.Tensor) else value
    t = torch.as_tensor(arr, dtype=torch.float64).detach().cpu()
    if not torch.isfinite(t).all():
        raise ParameterError(f"acquisition setting {name!r} contains NaN or Inf: {value}")
    return t


def scratch(
    work: dict[str, torch.Tensor] | None, key: str, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """A buffer of ``shape`` with ``like``'s dtype and device, kept in ``work`` under ``key``.

    Reused when ``work`` already holds one of that shape, dtype and device; a fresh
    ``torch.empty`` when ``work`` is None. For :meth:`Model.vjp_by_measurement`.
    """
    if work is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    buf = work.get(key)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = work[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


class Model:
    """Base class of signal models.

    Subclasses set :attr:`name`, :attr:`parameters` (a tuple of :class:`Parameter`), call
    ``super().__init__(**acquisition)`` with their acquisition arrays, and implement
    :meth:`forward`. They may implement :meth:`initial_guess` (closed-form starts),
    :meth:`derived` (maps computed from the parameters, e.g. T1 from MOLLI's T1*), and set
    :attr:`map_names` (BIDS-style file names).
    """

    name: str = "model"
    parameters: tuple[Parameter, ...] = ()
    #: names of per-voxel inputs (e.g. ``("b1",)``) read from :attr:`covariate_maps`
    covariates: tuple[str, ...] = ()
    #: parameter/derived name -> BIDS-style file stem (``{"T1": "T1map"}``)
    map_names: dict[str, str] = {}
    #: name of the acquisition setting that indexes the measurements (for shape messages)
    measurement_axis: str = "measurements"
    #: units of the derived maps (name -> unit)
    derived_units: dict[str, str] = {}

    def __init__(self, covariate_maps: Mapping[str, Any] | None = None, **acquisition: Any):
        self.acquisition: dict[str, torch.Tensor] = {
            k: _as_float64(k, v) for k, v in acquisition.items()
        }
        self.covariate_maps: dict[str, torch.Tensor | float] = {}
        for k, v in (covariate_maps or {}).items():
            if v is None:
                continue
            if k not in self.covariates:
                raise ParameterError(
                    f"{self.name}: unknown per-voxel input {k!r}; this model takes "
                    f"{list(self.covariates) or 'none'}"
                )
            self.covariate_maps[k] = v if isinstance(v, (int, float)) else _as_float64(k, v)
        self._device = torch.device("cpu")
        self._dtype = torch.float64
        self._bound: dict[str, torch.Tensor] = dict(self.acquisition)
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ModelError(f"{self.name}: duplicate parameter names {names}")

    # -- binding ---------------------------------------------------------------------------------
    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Model:
        """A copy whose acquisition tensors live on ``device`` in ``dtype``."""
        new = copy.copy(self)
        new._device = torch.device(device) if device is not None else self._device
        new._dtype = dtype or self._dtype
        new._bound = {
            k: v.to(device=new._device, dtype=new._dtype) for k, v in self.acquisition.items()
        }
        return new

    def __getattr__(self, name: str) -> torch.Tensor:
        # acquisition settings read as attributes inside forward(): self.ti, self.te, ...
        bound = self.__dict__.get("_bound")
        if bound is not None and name in bound:
            return bound[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # -- description -----------------------------------------------------------------------------
    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    @property
    def n_params(self) -> int:
        return len(self.parameters)

    @property
    def n_measurements(self) -> int:
        """Number of measurements the model predicts per voxel."""
        return int(self.forward(self._typical_batch(1)).shape[-1])

    def parameter(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise ParameterError(
            f"{self.name} has no parameter {name!r}; it has {self.parameter_names}"
        )

    def _typical_batch(self, n: int) -> dict[str, torch.Tensor]:
        p = {
            q.name: torch.full((n, 1), q.typical(), dtype=self._dtype, device=self._device)
            for q in self.parameters
        }
        for c in self.covariates:
            p[c] = torch.ones((n, 1), dtype=self._dtype, device=self._device)
        return p

    def describe(self) -> str:
        """A table of the parameters with bounds and units."""
        lines = [
            f"{self.name}: {type(self).__doc__.strip().splitlines()[0] if type(self).__doc__ else ''}"
        ]
        for p in self.parameters:
            rel = " (x data scale)" if p.amplitude else ""
            lines.append(
                f"  {p.name:<10} [{p.lower:g}, {p.upper:g}]{rel} {p.unit}  {p.description}"
            )
        for c in self.covariates:
            lines.append(f"  input {c} (per-voxel map, optional)")
        return "\n".join(lines)

    # -- physics ---------------------------------------------------------------------------------
    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Signal ``(V, n_meas)`` for parameters ``p`` (each ``(V, 1)``)."""
        raise NotImplementedError

    def initial_guess(
        self, data: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """Closed-form start from data ``(V, n_meas)`` in data units; None if the model has none.

        Returns a dict ``name -> (V,)`` in data units (amplitudes in the data's units).
        """
        return None

    def jacobian(
        self, p: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Optional hand-written derivatives: ``(signal (V, n_meas), {name: ∂signal/∂name})``.

        Each derivative is ``(V, n_meas)`` per unit of the parameter in physical units. The default
        (None) lets solvers differentiate :meth:`forward` by autodiff; a model whose forward pass is
        costly to differentiate that way (many small elementwise operations per measurement) can
        return closed-form derivatives here, which must agree with autodiff (test them).
        """
        return None

    def vjp_by_measurement(
        self, p: Mapping[str, torch.Tensor], work: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, Callable[..., dict[str, torch.Tensor]]] | None:
        """Optional signal and vector–Jacobian product in measurement-major layout.

        For whole-volume gradient solvers (``fit.adam``). ``p`` maps each parameter (and
        covariate) name to a ``(1, V)`` row. Returns ``(signal (n_meas, V), vjp)``, where
        ``vjp(q, w, out)`` takes ``q (n_meas, V)`` and weights ``w (n_meas,)`` and writes
        ``out[name][v] = Σ_m w[m]·q[m, v]·∂signal[m, v]/∂name[v]`` into the ``(V,)`` tensors of the
        dict ``out`` (one per parameter, physical units), returning ``out``: the gradient of a
        separable loss with ``q = ∂loss/∂signal``, i.e. :meth:`jacobian` contracted with ``q``.
        ``vjp`` is valid until the next call with the same ``work``.

        On the CPU, operations that broadcast a per-voxel factor over the measurements, and
        reductions over the measurements, run several times faster on ``(n_meas, V)`` rows than
        on ``(V, n_meas)`` (a short last axis), and a product written for the contraction shares
        factors between parameters that a stacked Jacobian repeats. ``work`` is a dict that a
        caller evaluating many times at the same ``V`` keeps between calls: the model holds its
        ``(n_meas, V)`` arrays there (see :func:`scratch`); fresh arrays of this size (a few
        hundred kB) come from ``mmap`` and page-fault on every call, which costs more than the
        arithmetic. The default (None) means "not provided"; an implementation must agree with
        :meth:`jacobian` (test it).
        """
        return None

    def derived(self, p: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps computed from fitted parameters (each ``(V,)``), e.g. T1 from T1* for MOLLI."""
        return {}

    def simulate(self, params: Mapping[str, Any], **inputs: Any) -> torch.Tensor:
        """Noiseless signal ``(*spatial, n_meas)`` for parameter maps of any shape (data units)."""
        tensors = {
            k: torch.as_tensor(
                np.asarray(v) if not isinstance(v, torch.Tensor) else v, dtype=self._dtype
            )
            for k, v in params.items()
        }
        missing = [n for n in self.parameter_names if n not in tensors]
        if missing:
            raise ParameterError(f"{self.name}.simulate: missing parameters {missing}")
        # NumPy's rule, not torch.broadcast_shapes: in torch 2.13 the latter imports sympy (≈1 s)
        shape = tuple(np.broadcast_shapes(*(tuple(t.shape) for t in tensors.values())))
        flat = {k: t.to(self._device).expand(shape).reshape(-1, 1) for k, t in tensors.items()}
        for c in self.covariates:
            v = inputs.get(c, self.covariate_maps.get(c, 1.0))
            t = torch.as_tensor(
                np.asarray(v) if not isinstance(v, torch.Tensor) else v,
                dtype=self._dtype,
                device=self._device,
            )
            flat[c] = t.expand(shape).reshape(-1, 1)
        with torch.no_grad():
            out = self.forward(flat)
        return out.reshape(*shape, out.shape[-1])

    def __repr__(self) -> str:
        acq = ", ".join(
            f"{k}={tuple(v.shape) if v.ndim else float(v)}" for k, v in self.acquisition.items()
        )
        return f"{type(self).__name__}({acq})"


# ------------------------------------------------------------------------------------------------
# user-defined models
# ------------------------------------------------------------------------------------------------
ParamSpec = Parameter | Sequence[Any] | Mapping[str, Any]


def _to_parameter(name: str, spec: ParamSpec, amplitude: bool) -> Parameter:
    if isinstance(spec, Parameter):
        if spec.name != name:
            raise ParameterError(
                f"parameter key {name!r} does not match Parameter.name {spec.name!r}"
            )
        return spec
    if isinstance(spec, Mapping):
        return Parameter(
            name=name,
            amplitude=spec.get("amplitude", amplitude),
            **{k: v for k, v in spec.items() if k != "amplitude"},
        )
    seq = list(spec)
    if len(seq) < 2:
        raise ParameterError(
            f"parameter {name!r}: give (lower, upper) or (lower, upper, unit), got {spec!r}"
        )
    unit = seq[2] if len(seq) > 2 else ""
    return Parameter(
        name=name, lower=float(seq[0]), upper=float(seq[1]), unit=unit, amplitude=amplitude
    )


@dataclass
class _FunctionSpec:
    fn: Callable[..., torch.Tensor]
    params: tuple[Parameter, ...]
    acq_names: tuple[str, ...]
    cov_names: tuple[str, ...]
    derived_fn: Callable[..., Mapping[str, torch.Tensor]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class FunctionModel(Model):
    """A model made from a plain function (see :func:`model_from_function`)."""

    def __init__(
        self,
        spec: _FunctionSpec,
        name: str,
        acquisition: Mapping[str, Any],
        covariate_maps: Mapping[str, Any] | None,
        map_names: Mapping[str, str] | None,
    ):
        self.name = name
        self.parameters = spec.params
        self.covariates = spec.cov_names
        self.map_names = dict(map_names or {})
        self._spec = spec
        super().__init__(covariate_maps=covariate_maps, **acquisition)

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {n: p[n] for n in self.parameter_names}
        kwargs.update({n: self._bound[n] for n in self._spec.acq_names})
        kwargs.update({n: p[n] for n in self.covariates if n in p})
        kwargs.update(self._spec.extras)
        out = self._spec.fn(**kwargs)
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"model function {self._spec.fn.__name__!r} must return a torch.Tensor, got "
                f"{type(out).__name__}; use torch operations (torch.exp, not numpy.exp)"
            )
        v = next(iter(p.values())).shape[0]
        if out.ndim == 1 and v == 1:
            out = out[None]
        if out.ndim != 2 or out.shape[0] != v:
            raise ModelError(
                f"model function {self._spec.fn.__name__!r} must return shape (V, n_meas) when "
                f"given parameters of shape (V, 1); got {tuple(out.shape)} for V={v}"
            )
        return out

    def derived(self, p):
        if self._spec.derived_fn is None:
            return {}
        return dict(self._spec.derived_fn(**p))


def model_from_function(
    fn: Callable[..., torch.Tensor],
    params: Mapping[str, ParamSpec],
    *,
    amplitude: Sequence[str] = (),
    covariates: Mapping[str, Any] | None = None,
    name: str | None = None,
    derived: Callable[..., Mapping[str, torch.Tensor]] | None = None,
    map_names: Mapping[str, str] | None = None,
    **acquisition: Any,
) -> Model:
    """Turn a plain PyTorch function into a :class:`Model` (the user writes only the physics).

    Parameters
    ----------
    fn : callable
        ``fn(**params, **acquisition, **covariates) -> Tensor (V, n_meas)``. Each parameter and
        covariate arrives as a ``(V, 1)`` column and each acquisition setting as a tensor (e.g.
        ``(n_meas,)``), so ordinary broadcasting gives the ``(V, n_meas)`` signal. Use torch
        operations; derivatives come from autograd.
    params : dict
        ``name -> (lower, upper)``, ``(lower, upper, unit)``, a dict of :class:`Parameter` fields,
        or a :class:`Parameter`.
    amplitude : sequence of str
        Names of parameters that scale the signal (bounds then relative to the data scale).
    covariates : dict, optional
        Per-voxel inputs ``name -> map`` (spatial shape) or scalar, passed to ``fn`` by name.
    name : str, optional
        Model name (default: the function's name).
    derived : callable, optional
        ``derived(**params) -> dict`` of extra maps (each ``(V, 1)`` in, ``(V, 1)`` or ``(V,)`` out).
    map_names : dict, optional
        File stems for :meth:`FitResult.save` (default: the parameter names).
    **acquisition
        Acquisition settings passed to ``fn`` by keyword (e.g. ``te=[5, 10, 20]`` in ms).

    Examples
    --------
    >>> def monoexp(S0, T2, te):
    ...     return S0 * torch.exp(-te / T2)
    >>> model = model_from_function(monoexp, {"S0": (0, 10), "T2": (1, 500, "ms")},
    ...                             amplitude=["S0"], te=[10, 20, 40, 80])
    """
    if not callable(fn):
        raise ModelError(f"model_from_function needs a callable, got {type(fn).__name__}")
    if not params:
        raise ModelError("model_from_function needs at least one parameter")
    unknown_amp = set(amplitude) - set(params)
    if unknown_amp:
        raise ParameterError(
            f"amplitude names {sorted(unknown_amp)} are not parameters {list(params)}"
        )
    plist = tuple(_to_parameter(n, s, n in amplitude) for n, s in params.items())
    cov = dict(covariates or {})
    try:
        sig = inspect.signature(fn)
        accepted = set(sig.parameters)
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    except (TypeError, ValueError):  # builtins without signature
        accepted, var_kw = set(), True
    needed = [n for n in (*params, *acquisition, *cov)]
    if not var_kw:
        missing = [n for n in needed if n not in accepted]
        if missing:
            raise ModelError(
                f"function {getattr(fn, '__name__', fn)!r} does not accept arguments {missing}; "
                f"its signature is {sig}"
            )
        required = [
            n
            for n, p in sig.parameters.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        unset = [n for n in required if n not in needed]
        if unset:
            raise ModelError(
                f"function {getattr(fn, '__name__', fn)!r} needs arguments {unset} that are "
                "neither parameters, acquisition settings nor covariates"
            )
    spec = _FunctionSpec(
        fn=fn, params=plist, acq_names=tuple(acquisition), cov_names=tuple(cov), derived_fn=derived
    )
    model = FunctionModel(
        spec, name or getattr(fn, "__name__", "model"), acquisition, cov, map_names
    )
    # validate shapes once, on a tiny batch, so mistakes surface here and not inside a solver
    try:
        out = model.forward(model._typical_batch(2))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model function {getattr(fn, '__name__', fn)!r} failed on a test batch of parameters "
            f"shaped (2, 1): {type(exc).__name__}: {exc}"
        ) from exc
    if out.ndim != 2:
        raise ShapeError(f"model function must return (V, n_meas), got {tuple(out.shape)}")
    return model
