"""Image series → parameter maps (the fitting engine behind one function)."""

from __future__ import annotations

from typing import Any

from .. import fit
from ..errors import ParameterError
from ..models import get as get_model
from .masking import resolve_mask


def fit_maps(
    series: Any,
    model: str,
    settings: dict[str, Any],
    *,
    mask: Any = None,
    solver: str = "lm",
    device: Any = None,
    **options: Any,
) -> fit.FitResult:
    """Fit ``model`` (a registry name, e.g. ``"molli"``) with acquisition ``settings`` (e.g.
    ``{"ti": [...]}`` in ms) to ``series (*spatial, n_meas)``; returns the :class:`FitResult`.

    ``mask``: a boolean array (*spatial), ``"auto"`` (the object found by
    :func:`qmrkit.pipelines.masking.object_mask`: background voxels come out NaN; its method,
    threshold and voxel count go to ``result.settings["mask"]`` and so to ``fit.json``), or None /
    ``"none"`` (default: every voxel)."""
    if solver not in ("lm", "adam"):
        raise ParameterError(f"solver must be 'lm' or 'adam', got {solver!r}")
    m = get_model(model, **settings)
    sel, auto = resolve_mask(mask, series)
    run = fit.lm if solver == "lm" else fit.adam
    result = run(m, series, mask=sel, device=device, progress=False, **options)
    if auto is not None:
        result.settings["mask"] = auto.sidecar()
    return result
