"""Regularisers for whole-volume fitting (:func:`qmrkit.fit.adam`).

A regulariser sees every parameter map in image shape at once. Two views are offered:

* ``maps``: physical units, zero outside the fitted voxels;
* ``normalized``: each parameter mapped to [0, 1] between its bounds (log-scaled parameters in log
  space). Built-in total variation works on this view, so one weight means the same for T1 in ms and
  for a fraction, and does not depend on the data's scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ParameterError, ShapeError


@dataclass
class RegularizerContext:
    """What a regulariser may read: maps (physical and normalised), the mask, voxel count."""

    maps: dict[str, torch.Tensor]
    normalized: dict[str, torch.Tensor]
    mask: torch.Tensor  # spatial bool: fitted voxels
    n_voxels: int


class Regularizer:
    """Base class: ``weight * penalty(ctx)`` is added to the data loss."""

    weight: float = 0.0
    #: parameter names the penalty reads (checked against the model before fitting)
    params: tuple[str, ...] = ()

    def penalty(self, ctx: RegularizerContext) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, ctx: RegularizerContext) -> torch.Tensor:
        return self.weight * self.penalty(ctx)


class TotalVariation(Regularizer):
    """Total variation of parameter maps (2D or 3D), on the [0, 1]-normalised parameters.

    Parameters
    ----------
    params : str or sequence of str
        Parameter names to regularise. With several names the penalty is the sum of each map's TV
        (GACELLE's λ·|∇f_n| + λ·|∇r_n|), or with ``coupled=True`` one vectorial TV of all of them.
    weight : float
        λ, relative to the data loss (mean per-voxel loss in units of the data scale).
    dims : int, optional
        2 for in-plane TV (first two image axes), 3 for volumetric TV (first three); default: all
        image axes, at most three.
    voxel_size : sequence of float, optional
        Voxel size per image axis (mm); differences are divided by it. Default: 1.
    isotropic : bool
        Isotropic TV (Euclidean norm of the gradient) or anisotropic (sum of absolute differences).
    eps : float
        Smoothing of the norm at zero (keeps the gradient finite).
    coupled : bool
        Vectorial (collaborative) TV: the norm at each voxel is taken over the differences of all
        ``params`` together, ``sqrt(Σ_p Σ_axis Δ_p²)`` (isotropic) or ``Σ_axis sqrt(Σ_p Δ_p²)``
        (anisotropic), so an edge shared by the maps costs less than the same edges apart and
        the maps are encouraged to change at the same places (Blomgren & Chan 1998).

    Notes
    -----
    Only differences between two fitted voxels count, so the mask edge is not penalised. The
    penalty is averaged over fitted voxels.
    """

    def __init__(
        self,
        params: str | Sequence[str],
        weight: float,
        *,
        dims: int | None = None,
        voxel_size: Sequence[float] | None = None,
        isotropic: bool = True,
        eps: float = 1e-4,
        coupled: bool = False,
    ):
        self.params = (params,) if isinstance(params, str) else tuple(params)
        if not self.params:
            raise ParameterError("TotalVariation needs at least one parameter name")
        if not weight >= 0:
            raise ParameterError(f"TotalVariation weight must be >= 0, got {weight}")
        if dims is not None and dims not in (1, 2, 3):
            raise ParameterError(f"TotalVariation dims must be 1, 2 or 3, got {dims}")
        self.weight = float(weight)
        self.dims = dims
        self.voxel_size = None if voxel_size is None else tuple(float(v) for v in voxel_size)
        self.isotropic = isotropic
        self.eps = float(eps)
        self.coupled = bool(coupled)

    def penalty(self, ctx: RegularizerContext) -> torch.Tensor:
        mask = ctx.mask
        nd = mask.ndim if self.dims is None else min(self.dims, mask.ndim)
        nd = min(nd, 3)
        vs = self.voxel_size or (1.0,) * mask.ndim
        if len(vs) < nd:
            raise ParameterError(
                f"voxel_size has {len(vs)} entries but TV runs over {nd} image axes"
            )
        total = torch.zeros((), dtype=next(iter(ctx.normalized.values())).dtype, device=mask.device)
        # one group per map, or one group of all maps (coupled): the norm is taken within a group
        groups = [self.params] if self.coupled else [(name,) for name in self.params]
        for group in groups:
            x0 = ctx.normalized[group[0]]
            sq = torch.zeros_like(x0)
            ab = torch.zeros_like(x0)
            for ax in range(nd):
                n = x0.shape[ax]
                if n < 2:
                    continue
                valid = mask.narrow(ax, 1, n - 1) & mask.narrow(ax, 0, n - 1)
                pad = [0, 0] * (x0.ndim - 1 - ax) + [0, 1]
                d2 = torch.zeros_like(x0)  # Σ over the group of squared differences along ax
                for name in group:
                    x = ctx.normalized[name]
                    d = (x.narrow(ax, 1, n - 1) - x.narrow(ax, 0, n - 1)) / vs[ax]
                    d = torch.where(valid, d, torch.zeros_like(d))
                    dfull = torch.nn.functional.pad(d, pad)
                    d2 = d2 + dfull * dfull
                if self.isotropic:
                    sq = sq + d2
                else:
                    ab = ab + torch.sqrt(d2 + self.eps**2) - self.eps
            tv = (torch.sqrt(sq + self.eps**2) - self.eps) if self.isotropic else ab
            total = total + tv[mask].sum() / max(ctx.n_voxels, 1)
        return total


class CustomRegularizer(Regularizer):
    """Any callable ``fn(maps) -> scalar tensor`` (physical-unit maps in image shape), weighted.

    Set ``normalized=True`` to receive the [0, 1]-normalised maps instead. The callable must use
    torch operations so autograd can differentiate it.
    """

    def __init__(
        self,
        fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        weight: float = 1.0,
        *,
        normalized: bool = False,
    ):
        if not callable(fn):
            raise ParameterError(f"CustomRegularizer needs a callable, got {type(fn).__name__}")
        self.fn, self.weight, self.normalized = fn, float(weight), normalized

    def penalty(self, ctx: RegularizerContext) -> torch.Tensor:
        out = self.fn(ctx.normalized if self.normalized else ctx.maps)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ParameterError(
                f"custom regulariser {getattr(self.fn, '__name__', self.fn)!r} must return a scalar "
                f"torch.Tensor, got {type(out).__name__}"
                + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
            )
        return out.reshape(())


def as_regularizer(obj: Regularizer | Callable | tuple) -> Regularizer:
    """Accept a Regularizer, a callable, or a ``(callable, weight)`` pair."""
    if isinstance(obj, Regularizer):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]):
        return CustomRegularizer(obj[0], float(obj[1]))
    if callable(obj):
        return CustomRegularizer(obj, 1.0)
    raise ParameterError(
        f"regularizers must be Regularizer objects, callables or (callable, weight) pairs; got "
        f"{type(obj).__name__}"
    )


# ------------------------------------------------------------------------------------------------
# total variation along the edges of a graph (surface meshes)
# ------------------------------------------------------------------------------------------------
class GraphTV(Regularizer):
    """Total variation along the edges of a graph: a triangle mesh or any explicit edge list.

    For surface-based fitting (GACELLE demo 1, paper 004 §2.6.1, its Eq. 5): parameters are laid
    out ``(n_vertices, ...)`` — the data passed to :func:`qmrkit.fit.adam` are
    ``(n_vertices[, ...], n_meas)`` — and neighbours are the vertices joined by an edge, not those
    close in space, so two banks of a sulcus that touch in the volume are never smoothed together.

    Parameters
    ----------
    params : str or sequence of str
        Parameter names to regularise.
    weight : float or mapping of str -> float
        λ relative to the data loss (as for :class:`TotalVariation`); a mapping gives each
        parameter its own λ (``{"f": 1e-5, "rn": 1e-6}``).
    edges : array (n_edges, 2) of int, optional
        Vertex pairs; each undirected pair counts once however often (and in whichever order) it
        is listed.
    faces : array (n_faces, 3) of int, optional
        Triangles; their unique undirected sides become the edges. Give ``edges`` or ``faces``.
    n_vertices : int, optional
        Number of vertices; checked against the edges now and against the data at fit time.
    edge_weights : array (n_edges,), optional
        Non-negative factor per edge (with ``edges`` only), multiplying its difference — e.g.
        ``1 / edge_length`` for differences per mm. Default 1.
    isotropic : bool
        False (default): Σ over edges of |Δθ| — Eq. 5 (which, summed over every vertex, counts
        each edge twice; here each edge counts once). True: Σ over vertices of the Euclidean norm
        of the differences to all its neighbours.
    eps : float
        Smoothing of the norm at zero: ``|x| ≈ sqrt(x² + eps²) − eps`` (a finite gradient).
    coupled : bool
        Vectorial TV of all ``params``: the norm is taken over the parameters' differences
        together, so the maps are encouraged to change along the same edges.

    Notes
    -----
    Works on the [0, 1]-normalised parameters, like :class:`TotalVariation`. Only edges whose two
    vertices are both fitted count. The penalty is divided by the number of fitted vertices.
    Trailing spatial axes (``(n_vertices, k)`` data, e.g. several depths) are regularised along
    the edges separately for each ``k``.
    """

    def __init__(
        self,
        params: str | Sequence[str],
        weight: float | Mapping[str, float],
        edges: Any = None,
        faces: Any = None,
        *,
        n_vertices: int | None = None,
        edge_weights: Any = None,
        isotropic: bool = False,
        eps: float = 1e-4,
        coupled: bool = False,
    ):
        from ..io.surface import check_edges, mesh_edges

        self.params = (params,) if isinstance(params, str) else tuple(params)
        if not self.params:
            raise ParameterError("GraphTV needs at least one parameter name")
        if isinstance(weight, Mapping):
            missing = [p for p in self.params if p not in weight]
            extra = [k for k in weight if k not in self.params]
            if missing or extra:
                raise ParameterError(
                    f"GraphTV per-parameter weights must name exactly the parameters {self.params}; "
                    f"missing {missing}, unexpected {extra}"
                )
            self.param_weights = tuple(float(weight[p]) for p in self.params)
            self.weight = 1.0
        else:
            self.param_weights = (1.0,) * len(self.params)
            self.weight = float(weight)
        if not (self.weight >= 0 and all(w >= 0 for w in self.param_weights)):
            raise ParameterError(f"GraphTV weights must be >= 0, got {weight}")
        if (edges is None) == (faces is None):
            raise ParameterError(
                "GraphTV needs exactly one of edges= (an (n_edges, 2) vertex-index array) or "
                "faces= (an (n_faces, 3) triangle array)"
            )
        if n_vertices is not None and int(n_vertices) < 1:
            raise ParameterError(f"GraphTV n_vertices must be >= 1, got {n_vertices}")
        self.n_vertices = None if n_vertices is None else int(n_vertices)
        if faces is not None:
            if edge_weights is not None:
                raise ParameterError(
                    "GraphTV edge_weights go with an explicit edges= list (their order is the "
                    "list's); with faces= build the edges with qmrkit.io.mesh_edges first"
                )
            e = mesh_edges(faces, self.n_vertices)
            w = None
        else:
            e = check_edges(edges, self.n_vertices)
            w = None
            if edge_weights is not None:
                w = np.asarray(
                    edge_weights.detach().cpu()
                    if isinstance(edge_weights, torch.Tensor)
                    else edge_weights,
                    dtype=np.float64,
                ).reshape(-1)
                if w.shape[0] != e.shape[0]:
                    raise ShapeError(
                        f"GraphTV edge_weights has {w.shape[0]} entries but there are "
                        f"{e.shape[0]} edges"
                    )
                if not (np.isfinite(w).all() and (w >= 0).all()):
                    raise ParameterError("GraphTV edge_weights must be finite and >= 0")
            # one entry per undirected edge: sort each pair, merge repeats (first weight kept)
            e = np.sort(e, axis=1)
            e, first = np.unique(e, axis=0, return_index=True)
            if w is not None:
                w = w[first]
        if e.shape[0] == 0:
            raise ShapeError("GraphTV got no edges: the graph must have at least one edge")
        self.edges = e  # (E, 2) int64, i < j
        self.edge_weights = w
        self.isotropic = bool(isotropic)
        self.eps = float(eps)
        self.coupled = bool(coupled)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def _tensors(self, device: torch.device, dtype: torch.dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            i = torch.as_tensor(self.edges[:, 0], device=device)
            j = torch.as_tensor(self.edges[:, 1], device=device)
            w = None
            if self.edge_weights is not None:
                w = torch.as_tensor(self.edge_weights, device=device, dtype=dtype)
            self._cache[key] = (i, j, w)
        return self._cache[key]

    def penalty(self, ctx: RegularizerContext) -> torch.Tensor:
        mask = ctx.mask
        if mask.ndim < 1:
            raise ShapeError("GraphTV needs data laid out (n_vertices[, ...], n_meas)")
        n = int(mask.shape[0])
        if self.n_vertices is not None and n != self.n_vertices:
            raise ShapeError(
                f"GraphTV was built for {self.n_vertices} vertices but the data have {n} along "
                f"their first axis (data shape (n_vertices[, ...], n_meas))"
            )
        top = int(self.edges[:, 1].max())
        if top >= n:
            raise ShapeError(
                f"GraphTV edges refer to vertex {top} but the data have {n} vertices along their "
                "first axis"
            )
        x0 = ctx.normalized[self.params[0]]
        i, j, w = self._tensors(x0.device, x0.dtype)
        valid = mask[i] & mask[j]  # (E, *rest)
        zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
        tail = (1,) * (mask.ndim - 1)
        groups = (
            [tuple(range(len(self.params)))]
            if self.coupled
            else [(k,) for k in range(len(self.params))]
        )
        total = zero
        for group in groups:
            d2 = zero
            for k in group:
                x = ctx.normalized[self.params[k]]
                d = x[i] - x[j]
                if w is not None:
                    d = d * w.reshape(-1, *tail)
                d = d * self.param_weights[k]
                d2 = d2 + d * d
            d2 = torch.where(valid, d2, zero)
            if self.isotropic:
                # each vertex sums the squared differences to all its neighbours (both ends)
                s = torch.zeros_like(x0).index_add(0, i, d2).index_add(0, j, d2)
                tv = (torch.sqrt(s + self.eps**2) - self.eps)[mask].sum()
            else:
                tv = (torch.sqrt(d2 + self.eps**2) - self.eps).sum()
            total = total + tv
        return total / max(ctx.n_voxels, 1)


# ------------------------------------------------------------------------------------------------
# priors: |θ − μ|/σ (Laplace) or ((θ − μ)/σ)² (Gaussian)
# ------------------------------------------------------------------------------------------------
PRIOR_KINDS = ("l1", "gaussian")


class Prior(Regularizer):
    """A prior on parameter values, ``|θ − μ| / σ`` (L1) or ``((θ − μ) / σ)²`` (Gaussian).

    GACELLE's prior-based regulariser (paper 004 Eq. 6): μ and σ per region of interest, e.g. the
    group mean and standard deviation of a high-SNR dataset, pull low-SNR estimates toward them.

    Parameters
    ----------
    params : str or sequence of str
        Parameters the prior acts on.
    mu, sigma : float, array or mapping of str -> (float or array), optional
        Prior centre and scale in the parameter's physical units: a scalar, or a map of the image
        shape (``(n_vertices,)`` on a surface; NaN where no prior applies). A mapping gives each
        parameter its own. Not needed when ``labels`` and ``table`` are given.
    weight : float
        λ relative to the data loss in :func:`qmrkit.fit.adam` (GACELLE: 1e-4).
    kind : {"l1", "gaussian"}
        ``"l1"``: ``|z|``; ``"gaussian"``: ``z²``, with ``z = (θ − μ)/σ``.
    labels : integer array of the image shape, optional
        Region label of every voxel/vertex; with ``table``.
    table : mapping, optional
        ``label -> (μ, σ)`` (one parameter) or ``label -> {param: (μ, σ)}``. Voxels whose label is
        not in the table (e.g. 0, background) get no prior.

    Notes
    -----
    In :func:`qmrkit.fit.adam` the penalty is ``weight · Σ_params mean over fitted voxels of |z|
    (or z²)``, so with an L2 data loss, ``mean_m ((θ − y_m)/s)²`` with ``s`` the data scale, a
    one-parameter model ``S = θ`` has the minimiser ``θ* = (ȳ/s² + λμ/σ²) / (1/s² + λ/σ²)``.

    In :func:`qmrkit.fit.mcmc` (``priors=[Prior(...)]``) the prior enters the log-posterior as a
    normalised density inside the parameter bounds: Laplace with scale σ for ``"l1"``
    (``−|z| − log 2σ``), normal N(μ, σ²) for ``"gaussian"`` (``−z²/2 − log σ√2π``). ``weight`` is
    a loss weight for ``adam`` and is not used there: the likelihood already has its own scale.
    """

    def __init__(
        self,
        params: str | Sequence[str],
        mu: Any = None,
        sigma: Any = None,
        weight: float = 1.0,
        kind: str = "l1",
        *,
        labels: Any = None,
        table: Mapping[Any, Any] | None = None,
    ):
        self.params = (params,) if isinstance(params, str) else tuple(params)
        if not self.params:
            raise ParameterError("Prior needs at least one parameter name")
        if kind not in PRIOR_KINDS:
            raise ParameterError(f"Prior kind must be one of {PRIOR_KINDS}, got {kind!r}")
        if not weight >= 0:
            raise ParameterError(f"Prior weight must be >= 0, got {weight}")
        self.weight, self.kind = float(weight), kind
        if (labels is None) != (table is None):
            raise ParameterError("Prior needs labels= and table= together (per-ROI μ, σ)")
        if table is not None:
            if mu is not None or sigma is not None:
                raise ParameterError("Prior takes either mu/sigma or labels/table, not both")
            self._spec = ("table", _label_array(labels), self._parse_table(table))
        else:
            if mu is None or sigma is None:
                raise ParameterError(
                    "Prior needs mu and sigma (scalars, maps or per-parameter mappings), or "
                    "labels and table"
                )
            self._spec = ("values", self._per_param(mu, "mu"), self._per_param(sigma, "sigma"))
            for p, s in self._spec[2].items():
                sv = np.asarray(_as_numpy(s), dtype=np.float64)
                # NaN marks voxels without a prior; anything else must be a finite positive scale
                if not (np.isnan(sv) | (np.isfinite(sv) & (sv > 0))).all():
                    raise ParameterError(
                        f"Prior sigma for {p!r} must be finite and > 0 (NaN: no prior there)"
                    )
        self._cache: dict[tuple, dict[str, tuple[torch.Tensor, ...]]] = {}

    def _per_param(self, v: Any, what: str) -> dict[str, Any]:
        if isinstance(v, Mapping):
            missing = [p for p in self.params if p not in v]
            if missing:
                raise ParameterError(f"Prior {what} lacks parameters {missing}; got {list(v)}")
            return {p: v[p] for p in self.params}
        return {p: v for p in self.params}

    def _parse_table(self, table: Mapping[Any, Any]) -> dict[str, dict[int, tuple[float, float]]]:
        out: dict[str, dict[int, tuple[float, float]]] = {p: {} for p in self.params}
        if not table:
            raise ParameterError("Prior table is empty; give label -> (mu, sigma)")
        for lab, entry in table.items():
            if isinstance(entry, Mapping):
                per = entry
            elif len(self.params) == 1:
                per = {self.params[0]: entry}
            else:
                raise ParameterError(
                    f"Prior table entry for label {lab!r} must map each of {self.params} to "
                    f"(mu, sigma), got {entry!r}"
                )
            for p, ms in per.items():
                if p not in out:
                    raise ParameterError(f"Prior table names {p!r}, not one of {self.params}")
                if not (isinstance(ms, Sequence) and len(ms) == 2):
                    raise ParameterError(
                        f"Prior table entry {lab!r}/{p!r} must be (mu, sigma), got {ms!r}"
                    )
                m, s = float(ms[0]), float(ms[1])
                if not (math.isfinite(m) and math.isfinite(s) and s > 0):
                    raise ParameterError(
                        f"Prior table entry {lab!r}/{p!r}: need finite mu and sigma > 0, got {ms!r}"
                    )
                out[p][int(lab)] = (m, s)
        return out

    def resolve(
        self, spatial_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``param -> (mu, sigma, active)`` as flat tensors over the image grid (``active``: the
        voxels where the prior applies)."""
        key = (tuple(spatial_shape), str(device), dtype)
        if key in self._cache:
            return self._cache[key]
        n = math.prod(spatial_shape)
        out = {}
        if self._spec[0] == "table":
            labels, tab = self._spec[1], self._spec[2]
            if tuple(labels.shape) != tuple(spatial_shape):
                raise ShapeError(
                    f"Prior labels have shape {tuple(labels.shape)} but the image shape is "
                    f"{tuple(spatial_shape)}"
                )
            flat = labels.reshape(-1)
            for p in self.params:
                mu = np.zeros(n)
                sg = np.ones(n)
                act = np.zeros(n, dtype=bool)
                for lab, (m, s) in tab[p].items():
                    sel = flat == lab
                    mu[sel], sg[sel], act[sel] = m, s, True
                out[p] = (mu, sg, act)
        else:
            for p in self.params:
                vals = []
                for what, v in (("mu", self._spec[1][p]), ("sigma", self._spec[2][p])):
                    a = _as_numpy(v).astype(np.float64)
                    if a.ndim == 0:
                        a = np.full(n, float(a))
                    elif tuple(a.shape) != tuple(spatial_shape):
                        raise ShapeError(
                            f"Prior {what} map for {p!r} has shape {a.shape} but the image shape "
                            f"is {tuple(spatial_shape)}"
                        )
                    vals.append(a.reshape(-1))
                act = np.isfinite(vals[0]) & np.isfinite(vals[1])
                out[p] = (np.where(act, vals[0], 0.0), np.where(act, vals[1], 1.0), act)
        res = {
            p: (
                torch.as_tensor(m, dtype=dtype, device=device),
                torch.as_tensor(s, dtype=dtype, device=device),
                torch.as_tensor(a, device=device),
            )
            for p, (m, s, a) in out.items()
        }
        self._cache[key] = res
        return res

    def _z(self, theta: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (theta - mu) / sigma

    def penalty(self, ctx: RegularizerContext) -> torch.Tensor:
        mask = ctx.mask
        x0 = ctx.maps[self.params[0]]
        res = self.resolve(tuple(mask.shape), x0.device, x0.dtype)
        m = mask.reshape(-1)
        total = torch.zeros((), dtype=x0.dtype, device=x0.device)
        for p in self.params:
            mu, sg, act = res[p]
            z = self._z(ctx.maps[p].reshape(-1), mu, sg)
            r = z.abs() if self.kind == "l1" else z * z
            total = total + r[m & act].sum()
        return total / max(ctx.n_voxels, 1)

    def bind_voxels(
        self,
        index: torch.Tensor,
        spatial_shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
    ) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
        """The log-prior density of rows at flat image positions ``index (n,)``, as a callable
        ``fn(params) -> (n,)`` over physical ``(n, 1)`` columns (used by :func:`qmrkit.fit.mcmc`;
        μ, σ are gathered once here so each evaluation is arithmetic only)."""
        res = self.resolve(tuple(spatial_shape), device, dtype)
        idx = index.to(device)
        cols = []
        for p in self.params:
            mu, sg, act = res[p]
            mu_r, sg_r, act_r = mu[idx], sg[idx], act[idx]
            if self.kind == "l1":
                const = -torch.log(2 * sg_r)
            else:
                const = -torch.log(sg_r) - 0.5 * math.log(2 * math.pi)
            cols.append((p, mu_r, sg_r, act_r.to(dtype), torch.where(act_r, const, 0.0)))
        kind = self.kind

        def log_prior(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
            out = None
            for p, mu_r, sg_r, a, c in cols:
                z = (params[p].reshape(-1) - mu_r) / sg_r
                lp = (-z.abs() if kind == "l1" else -0.5 * z * z) * a + c
                out = lp if out is None else out + lp
            return out

        return log_prior


def _as_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _label_array(labels: Any) -> np.ndarray:
    a = _as_numpy(labels)
    if a.dtype.kind not in "iub":
        if a.dtype.kind == "f" and np.all(a[np.isfinite(a)] == np.round(a[np.isfinite(a)])):
            a = np.where(np.isfinite(a), a, -1)
        else:
            raise ParameterError(f"Prior labels must be integers, got dtype {a.dtype}")
    return a.astype(np.int64)
