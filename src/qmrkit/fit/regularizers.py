"""Regularisers for whole-volume fitting (:func:`qmrkit.fit.adam`).

A regulariser sees every parameter map in image shape at once. Two views are offered:

* ``maps``: physical units, zero outside the fitted voxels;
* ``normalized``: each parameter mapped to [0, 1] between its bounds (log-scaled parameters in log
  space). Built-in total variation works on this view, so one weight means the same for T1 in ms and
  for a fraction, and does not depend on the data's scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ParameterError


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
