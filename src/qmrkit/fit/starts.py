"""Choosing where a solver starts: user values, a model's closed form, or a dictionary search."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._progress import get_logger
from ..errors import ParameterError
from .dictionary import dictionary_atoms, search
from .problem import Problem

log = get_logger("fit.starts")

START_METHODS = ("auto", "closed_form", "dictionary", "typical")


def initial_theta(
    problem: Problem,
    init: Any = None,
    *,
    start: str = "auto",
    n_atoms: int = 5000,
    seed: int | None = 0,
) -> tuple[torch.Tensor, str]:
    """Internal ``theta (V, P)`` to start from, and a word saying where it came from.

    ``init`` (a :class:`~qmrkit.fit.FitResult`, or a dict of maps in image shape or of scalars, in
    physical units) wins when given. Otherwise ``start`` selects: ``"auto"`` (the model's closed
    form if it has one, else a dictionary search), ``"closed_form"``, ``"dictionary"``, or
    ``"typical"`` (each parameter's typical value everywhere).
    """
    if start not in START_METHODS:
        raise ParameterError(f"start must be one of {START_METHODS}, got {start!r}")
    if init is not None:
        maps = getattr(init, "maps", init)
        if not isinstance(maps, Mapping):
            raise ParameterError(
                f"init must be a FitResult or a dict of parameter maps, got {type(init).__name__}"
            )
        theta = problem.from_physical(maps, spatial=True)
        bad = ~torch.isfinite(theta).all(dim=1)
        if bad.any():
            theta[bad] = _typical(problem, int(bad.sum()))
        return problem.clamp(theta), "init"
    if start == "typical":
        return _typical(problem, problem.n_voxels), "typical"
    if start in ("auto", "closed_form"):
        with torch.no_grad():
            guess = problem.model.initial_guess(problem.data * problem.scale, problem.inputs)
        if guess is not None:
            theta = problem.from_physical(guess, spatial=False)
            bad = ~torch.isfinite(theta).all(dim=1)
            if bad.any():
                log.info(
                    "closed-form start failed in %d voxels; searching a dictionary there",
                    int(bad.sum()),
                )
                sub = problem.subset(torch.nonzero(bad).reshape(-1))
                theta[bad] = search(sub, dictionary_atoms(sub, n_atoms, seed))
            return problem.clamp(theta), "closed_form"
        if start == "closed_form":
            raise ParameterError(f"model {problem.model.name!r} has no closed-form initial guess")
    theta = search(problem, dictionary_atoms(problem, n_atoms, seed))
    return theta, "dictionary"


def _typical(problem: Problem, n: int) -> torch.Tensor:
    vals = torch.tensor(
        [p.typical() for p in problem.model.parameters], dtype=problem.dtype, device=problem.device
    )
    return problem.clamp(vals.expand(n, -1).clone())
