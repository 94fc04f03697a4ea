"""Pattern matching of MRF time courses (or subspace coefficients) to a dictionary."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import NonFiniteWarning, QmrkitWarning, ShapeError
from .dictionary import Dictionary


@dataclass
class MatchResult:
    """Maps from matching, in the input's spatial shape.

    T1, T2 in ms; B1 as a fraction of nominal; M0 complex (proton density times receive phase);
    PD = |M0|; score = |⟨atom, x⟩| / ‖x‖ in [0, 1] (1: perfect match); index of the atom.
    """

    t1: torch.Tensor
    t2: torch.Tensor
    b1: torch.Tensor
    m0: torch.Tensor
    score: torch.Tensor
    index: torch.Tensor
    n_b1_clipped: int = 0

    @property
    def pd(self) -> torch.Tensor:
        return self.m0.abs()

    def maps(self) -> dict[str, torch.Tensor]:
        return {"T1": self.t1, "T2": self.t2, "B1": self.b1, "PD": self.pd, "score": self.score}


def _refine(x, atoms, best, nb, d_t1, d_t2, sel):
    """Parabolic sub-grid refinement of T1 and T2 along their log grids (see :func:`match`)."""
    vox = torch.nonzero(sel).reshape(-1)
    b = best[vox]
    xv = x[vox]

    def score(idx: torch.Tensor) -> torch.Tensor:
        return (xv * atoms[idx].conj()).sum(-1).abs()

    s0 = score(b)
    out = []
    for (cm, cp), dv in (((0, 1), d_t1), ((2, 3), d_t2)):
        im, ip = nb[b, cm], nb[b, cp]
        ok = (im >= 0) & (ip >= 0)
        im, ip = im.clamp_min(0), ip.clamp_min(0)
        sm, sp = score(im), score(ip)
        curv = sm - 2 * s0 + sp
        ok &= curv < 0  # the best atom is a maximum between its neighbours
        delta = torch.where(ok, 0.5 * (sm - sp) / torch.where(ok, curv, -1.0), 0.0).clamp(-0.5, 0.5)
        half_step = 0.5 * (torch.log(dv[ip]) - torch.log(dv[im]))
        full = dv[best].clone()
        full[vox] = torch.where(ok, torch.exp(torch.log(dv[b]) + delta * half_step), dv[b])
        out.append(full)
    return out[0], out[1]


class B1RangeWarning(QmrkitWarning):
    """B1 values outside the dictionary's range were clipped to it."""


def match(
    x: Any,
    dictionary: Dictionary,
    *,
    b1_map: Any = None,
    mask: Any = None,
    chunk: int = 8192,
    atom_chunk: int = 65536,
    refine: bool = True,
) -> MatchResult:
    """Find the best-matching atom for every voxel.

    Parameters
    ----------
    x : array (*spatial, n_tr) or (*spatial, rank)
        Time courses, or subspace coefficients when the last axis equals the dictionary's rank.
    dictionary : Dictionary
    b1_map : array (*spatial), optional
        Measured B1 (fraction of nominal). Each voxel then searches only the atoms at the
        dictionary B1 value nearest to its own; values outside the dictionary's B1 range are clipped
        with a warning that counts them.
    mask : array (*spatial), optional
        Voxels to match (others get NaN / 0).
    chunk, atom_chunk : int
        Voxels and atoms per block (bounds memory).
    refine : bool
        Sub-grid refinement: fit a parabola to the match score of the best atom and its T1 and T2
        neighbours on the dictionary grid (in log T1, log T2) and move to its vertex (at most half a
        grid step). Needs a dictionary built on a grid.

    Returns
    -------
    MatchResult
    """
    xt = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    dev = dictionary.t1.device
    n_tr = dictionary.schedule.n_tr
    last = xt.shape[-1]
    if dictionary.atoms is not None and last == n_tr:
        atoms, norms = dictionary.atoms, dictionary.norms
    elif dictionary.coeffs is not None and last == dictionary.rank:
        atoms, norms = dictionary.coeffs, dictionary.coeff_norms
    else:
        expected = [str(n_tr)] if dictionary.atoms is not None else []
        if dictionary.rank is not None:
            expected.append(f"{dictionary.rank} (subspace rank)")
        raise ShapeError(
            f"the last axis of x has {last} entries; this dictionary matches {' or '.join(expected)} "
            f"(time frames of the schedule, or subspace coefficients)"
        )
    spatial = tuple(xt.shape[:-1])
    flat = xt.reshape(-1, last).to(device=dev, dtype=atoms.dtype)
    nvox = flat.shape[0]
    sel = torch.ones(nvox, dtype=torch.bool, device=dev)
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).to(
            dev
        )
        if tuple(m.shape) != spatial:
            raise ShapeError(f"mask has shape {tuple(m.shape)} but x has spatial shape {spatial}")
        sel &= m.reshape(-1) != 0
    finite = torch.isfinite(flat).all(dim=1)
    n_bad = int((sel & ~finite).sum())
    if n_bad:
        warnings.warn(
            f"match: {n_bad} voxel(s) with NaN/Inf were skipped", NonFiniteWarning, stacklevel=2
        )
    sel &= finite
    b1_values = dictionary.b1_values
    groups: list[tuple[torch.Tensor, torch.Tensor]] = []
    n_clip = 0
    vox = torch.nonzero(sel).reshape(-1)
    if b1_map is None or b1_values.numel() == 1:
        groups.append((vox, torch.arange(dictionary.n_atoms, device=dev)))
    else:
        b = torch.as_tensor(np.asarray(b1_map) if not isinstance(b1_map, torch.Tensor) else b1_map)
        if tuple(b.shape) != spatial:
            raise ShapeError(f"b1_map has shape {tuple(b.shape)} but x has spatial shape {spatial}")
        b = b.to(dev, b1_values.dtype).reshape(-1)[vox]
        lo, hi = b1_values.min(), b1_values.max()
        step = (
            (b1_values[1:] - b1_values[:-1]).min() if b1_values.numel() > 1 else torch.tensor(0.0)
        )
        outside = (b < lo - 0.5 * step) | (b > hi + 0.5 * step) | ~torch.isfinite(b)
        n_clip = int(outside.sum())
        if n_clip:
            warnings.warn(
                f"match: B1 of {n_clip} voxel(s) lies outside the dictionary's range "
                f"[{float(lo):.3g}, {float(hi):.3g}] and was clipped to it",
                B1RangeWarning,
                stacklevel=2,
            )
        b = torch.nan_to_num(b, nan=1.0).clamp(float(lo), float(hi))
        nearest = torch.argmin((b[:, None] - b1_values[None, :]).abs(), dim=1)
        for j in range(b1_values.numel()):
            vj = vox[nearest == j]
            if vj.numel():
                groups.append((vj, torch.nonzero(dictionary.b1 == b1_values[j]).reshape(-1)))

    best = torch.zeros(nvox, dtype=torch.long, device=dev)
    best_ip = torch.zeros(nvox, dtype=atoms.dtype, device=dev)
    for vj, aj in groups:
        for v0 in range(0, vj.numel(), chunk):
            vi = vj[v0 : v0 + chunk]
            xv = flat[vi]
            top = torch.full((vi.numel(),), -1.0, dtype=norms.dtype, device=dev)
            arg = torch.zeros(vi.numel(), dtype=torch.long, device=dev)
            ipbest = torch.zeros(vi.numel(), dtype=atoms.dtype, device=dev)
            for a0 in range(0, aj.numel(), atom_chunk):
                ai = aj[a0 : a0 + atom_chunk]
                ip = xv @ atoms[ai].conj().T  # ⟨atom, x⟩ for every pair: (v, a)
                val, k = ip.abs().max(dim=1)
                better = val > top
                top = torch.where(better, val, top)
                arg = torch.where(better, ai[k], arg)
                ipbest = torch.where(better, ip.gather(1, k[:, None])[:, 0], ipbest)
            best[vi] = arg
            best_ip[vi] = ipbest
    xnorm = torch.linalg.vector_norm(flat, dim=1).clamp_min(1e-30)
    nan = float("nan")

    def to_map(v: torch.Tensor, fill: Any) -> torch.Tensor:
        out = torch.full((nvox,), fill, dtype=v.dtype, device=dev)
        out[sel] = v[sel]
        return out.reshape(spatial)

    m0 = best_ip / norms[best]
    t1v, t2v = dictionary.t1[best], dictionary.t2[best]
    nb = dictionary.neighbours() if refine else None
    if nb is not None:
        t1v, t2v = _refine(flat, atoms, best, nb, dictionary.t1, dictionary.t2, sel)
    return MatchResult(
        t1=to_map(t1v, nan),
        t2=to_map(t2v, nan),
        b1=to_map(dictionary.b1[best], nan),
        m0=to_map(m0, 0),
        score=to_map((best_ip.abs() / xnorm).to(norms.dtype), nan),
        index=to_map(best, -1),
        n_b1_clipped=n_clip,
    )
