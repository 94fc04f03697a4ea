"""Image series → parameter maps (the fitting engine behind one function)."""

from __future__ import annotations

from typing import Any

from .. import fit
from ..errors import ParameterError
from ..models import get as get_model


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
    ``{"ti": [...]}`` in ms) to ``series (*spatial, n_meas)``; returns the :class:`FitResult`."""
    m = get_model(model, **settings)
    if solver == "lm":
        return fit.lm(m, series, mask=mask, device=device, progress=False, **options)
    if solver == "adam":
        return fit.adam(m, series, mask=mask, device=device, progress=False, **options)
    raise ParameterError(f"solver must be 'lm' or 'adam', got {solver!r}")
