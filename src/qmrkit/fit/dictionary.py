"""Starting points: a batched search over a dictionary of parameter values.

For each voxel, the atom (parameter set) whose signal is closest to the data wins. When the model
has amplitude parameters, the signal is homogeneous of degree one in them, so each atom is scaled
by its least-squares factor per voxel (a projection) and amplitudes need not be sampled finely.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..errors import BoundsError, ParameterError
from .problem import Problem, make_problem
from .result import FitResult


def dictionary_atoms(problem: Problem, n_atoms: int, seed: int | None = 0) -> torch.Tensor:
    """Random parameter sets ``(n_atoms, P)`` in internal units, within the bounds.

    Log-scale parameters are sampled log-uniformly, the others uniformly; amplitude parameters are
    drawn in [0.5, 1.5]·typical when the model has a single amplitude (the scale is solved per voxel)
    and uniformly between their bounds otherwise (ratios between amplitudes matter).
    """
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    cols = []
    amps = [p for p in problem.model.parameters if p.amplitude]
    for p in problem.model.parameters:
        u = torch.rand(n_atoms, generator=gen, dtype=torch.float64)
        if p.amplitude and len(amps) == 1:
            cols.append(torch.ones(n_atoms, dtype=torch.float64))
            continue
        if not p.finite:
            raise BoundsError(
                f"dictionary search needs finite bounds; parameter {p.name!r} has "
                f"[{p.lower}, {p.upper}]. Give finite bounds or an initial guess (init=...)"
            )
        lo, hi = p.lower, p.upper
        if p.log_scale:
            cols.append(torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
        else:
            cols.append(lo + u * (hi - lo))
    return torch.stack(cols, dim=1).to(device=problem.device, dtype=problem.dtype)


@torch.no_grad()
def search(
    problem: Problem, atoms: torch.Tensor, *, voxel_chunk: int = 16384, atom_chunk: int = 4096
) -> torch.Tensor:
    """Best atom per voxel (internal ``theta (V, P)``), amplitude scaled by projection."""
    amp = problem.amplitude_mask
    has_amp = bool(amp.any())
    V, P = problem.n_voxels, atoms.shape[1]
    best_theta = torch.empty((V, P), dtype=problem.dtype, device=problem.device)
    has_cov = bool(problem.inputs)
    amp_lo = problem.lower[amp].max() if has_amp else None
    for v0 in range(0, V, voxel_chunk):
        sl = slice(v0, min(V, v0 + voxel_chunk))
        d = problem.data[sl]
        w = problem.weights[sl] if problem.weights is not None else None
        nv = d.shape[0]
        best_cost = torch.full((nv,), float("inf"), dtype=problem.dtype, device=problem.device)
        best_idx = torch.zeros(nv, dtype=torch.long, device=problem.device)
        best_c = torch.ones(nv, dtype=problem.dtype, device=problem.device)
        for a0 in range(0, atoms.shape[0], atom_chunk):
            a = atoms[a0 : a0 + atom_chunk]
            na = a.shape[0]
            if has_cov:  # signals depend on the voxel: evaluate (nv × na) atoms
                theta = a[None].expand(nv, na, P).reshape(-1, P)
                idx = torch.arange(v0, v0 + nv, device=problem.device).repeat_interleave(na)
                s = problem.predict(theta, idx).reshape(nv, na, -1)
            else:
                s = problem.predict(a)[None]  # (1, na, M)
            dd = d[:, None, :]
            ww = w[:, None, :] if w is not None else None
            if has_amp:
                num = _dot(s, dd, ww)  # (nv, na)
                den = _dot(s, s, ww).clamp_min(1e-30)
                c = (num / den).clamp_min(0.0)
                if amp_lo is not None and float(amp_lo) > 0:
                    c = c.clamp_min(0.0)
                cost = _dot(dd, dd, ww) - 2 * c * num + c * c * den
            else:
                diff = s - dd
                cost = _dot(diff, diff, ww)
                c = None
            cmin, imin = cost.min(dim=1)
            better = cmin < best_cost
            best_cost = torch.where(better, cmin, best_cost)
            best_idx = torch.where(better, imin + a0, best_idx)
            if c is not None:
                cbest = c.gather(1, imin[:, None])[:, 0]
                best_c = torch.where(better, cbest, best_c)
        th = atoms[best_idx].clone()
        if has_amp:
            th[:, amp] = th[:, amp] * best_c[:, None]
        best_theta[sl] = problem.clamp(th)
    return best_theta


def _dot(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    prod = a.conj() * b if a.is_complex() else a * b
    if w is not None:
        prod = prod * w
    out = prod.sum(-1)
    return out.real if out.is_complex() else out


def dictionary_search(
    model: Any,
    data: Any,
    *,
    mask: Any = None,
    weights: Any = None,
    n_atoms: int = 20000,
    seed: int | None = 0,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
) -> FitResult:
    """Fit by searching a random dictionary of parameter values (no iterations).

    Useful on its own for non-smooth or multi-modal models, and as the start of ``lm``/``adam`` for
    models without a closed-form start.

    Parameters
    ----------
    model : Model
        The signal model.
    data : array (*spatial, n_meas)
        Image series, measurement axis last.
    mask : array (*spatial), optional
        Voxels to fit (default: all).
    weights : array (*spatial) or (*spatial, n_meas), optional
        Non-negative weights of the squared residuals.
    n_atoms : int
        Number of random parameter sets (log-uniform for log-scale parameters).
    seed : int
        Seed of the dictionary sampling (results are reproducible).
    device, dtype
        Where and in which precision to compute.

    Returns
    -------
    FitResult
        Maps of the best atom per voxel (amplitudes by projection).
    """
    if n_atoms < 1:
        raise ParameterError(f"n_atoms must be >= 1, got {n_atoms}")
    t0 = time.perf_counter()
    problem = make_problem(
        model,
        data,
        mask=mask,
        weights=weights,
        device=device,
        dtype=dtype,
        solver="dictionary_search",
    )
    theta = search(problem, dictionary_atoms(problem, n_atoms, seed))
    return FitResult.from_theta(
        problem,
        theta,
        solver="dictionary_search",
        converged=torch.ones(problem.n_voxels, dtype=torch.bool, device=problem.device),
        iterations=torch.zeros(problem.n_voxels, dtype=torch.int32, device=problem.device),
        loss_history=[],
        elapsed_s=time.perf_counter() - t0,
        settings={"n_atoms": n_atoms, "seed": seed},
    )
