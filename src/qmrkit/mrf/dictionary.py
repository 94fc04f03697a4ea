"""MRF dictionaries over T1×T2×B1: normalised atoms, SVD compression, save/load."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._device import resolve_device
from .._progress import get_logger
from ..errors import DataFileError, ParameterError
from .epg import epg_fisp
from .sequences import Schedule

log = get_logger("mrf.dictionary")


def log_grid(lo: float, hi: float, step: float = 0.05) -> np.ndarray:
    """Values from ``lo`` to ``hi`` spaced by a constant relative ``step`` (0.05 = 5 %)."""
    if not (0 < lo < hi) or not step > 0:
        raise ParameterError(f"log_grid needs 0 < lo < hi and step > 0, got {lo}, {hi}, {step}")
    n = int(math.floor(math.log(hi / lo) / math.log1p(step))) + 1
    return lo * (1 + step) ** np.arange(n)


@dataclass
class Dictionary:
    """A bank of simulated MRF signals (atoms) and the parameters that made them.

    Attributes
    ----------
    t1, t2, b1 : Tensor (N,)
        Parameters of each atom (ms, ms, fraction of nominal).
    atoms : Tensor (N, n_tr) or None
        Unit-norm complex time courses (None once dropped to save memory).
    norms : Tensor (N,)
        Norm of each unnormalised atom (signal for M0 = 1): M0 = ⟨atom, x⟩ / norm.
    basis : Tensor (n_tr, rank) or None
        Orthonormal temporal basis (SVD of the atoms); coefficients of a time course x are
        ``x @ basis.conj()``.
    coeffs, coeff_norms : Tensor (N, rank), (N,)
        Unit-norm compressed atoms and the norm of each unnormalised compressed atom.
    schedule : Schedule
    """

    t1: torch.Tensor
    t2: torch.Tensor
    b1: torch.Tensor
    atoms: torch.Tensor | None
    norms: torch.Tensor
    schedule: Schedule
    basis: torch.Tensor | None = None
    coeffs: torch.Tensor | None = None
    coeff_norms: torch.Tensor | None = None
    energy: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: grid axes (T1, T2, B1 values) and, per atom, its (i_T1, i_T2, i_B1) indices, when built on a grid
    grid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    grid_index: torch.Tensor | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        schedule: Schedule,
        *,
        t1: Any,
        t2: Any,
        b1: Any = (1.0,),
        rank: int | None = None,
        energy: float | None = 0.9999,
        keep_atoms: bool = True,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
        tol: float = 1e-5,
        batch_size: int = 32768,
        progress: bool | None = None,
    ) -> Dictionary:
        """Simulate every (T1, T2, B1) combination with T2 ≤ T1 by EPG and normalise.

        Parameters
        ----------
        schedule : Schedule
            The acquisition.
        t1, t2 : sequence of float
            Grid values in ms (e.g. :func:`log_grid` (10, 4000) and (1, 500)).
        b1 : sequence of float
            B1 values (fraction of nominal).
        rank, energy : optional
            SVD compression: a fixed rank, or the smallest rank retaining ``energy`` of the
            dictionary's energy (default 0.9999). ``rank=None, energy=None`` skips compression.
        keep_atoms : bool
            Keep the full time courses (needed to match full time courses).
        device, dtype, tol, batch_size
            Simulation placement, precision and EPG truncation tolerance.
        progress : bool or None
            Progress bar of the EPG simulation (None: on a terminal or in a notebook).
        """
        dev = resolve_device(device)
        t1v = np.unique(np.asarray(t1, dtype=np.float64).reshape(-1))
        t2v = np.unique(np.asarray(t2, dtype=np.float64).reshape(-1))
        b1v = np.unique(np.asarray(b1, dtype=np.float64).reshape(-1))
        if t1v.size == 0 or t2v.size == 0 or b1v.size == 0:
            raise ParameterError("the T1, T2 and B1 grids must be non-empty")
        if (t1v <= 0).any() or (t2v <= 0).any() or (b1v <= 0).any():
            raise ParameterError("grid values must be positive (T1, T2 in ms; B1 as a fraction)")
        T1, T2, B1 = np.meshgrid(t1v, t2v, b1v, indexing="ij")
        keep = T2 <= T1
        if not keep.any():
            raise ParameterError(
                f"the dictionary grid is empty after removing T2 > T1 (T1 {t1v.min():g}–{t1v.max():g} ms, "
                f"T2 {t2v.min():g}–{t2v.max():g} ms)"
            )
        I1, I2, IB = np.meshgrid(
            np.arange(t1v.size), np.arange(t2v.size), np.arange(b1v.size), indexing="ij"
        )
        index = np.stack([I1[keep], I2[keep], IB[keep]], axis=1)
        T1, T2, B1 = T1[keep], T2[keep], B1[keep]
        t0 = time.perf_counter()
        atoms = epg_fisp(
            schedule,
            T1,
            T2,
            B1,
            device=dev,
            dtype=dtype,
            tol=tol,
            batch_size=batch_size,
            progress=progress,
        )
        elapsed = time.perf_counter() - t0
        norms = torch.linalg.vector_norm(atoms, dim=1)
        atoms = atoms / norms.clamp_min(1e-30)[:, None]
        d = cls(
            t1=torch.as_tensor(T1, dtype=dtype, device=dev),
            t2=torch.as_tensor(T2, dtype=dtype, device=dev),
            b1=torch.as_tensor(B1, dtype=dtype, device=dev),
            atoms=atoms,
            norms=norms.to(dtype),
            schedule=schedule,
            info={"simulation_s": elapsed, "atoms_per_s": len(T1) / max(elapsed, 1e-12)},
            grid=(t1v, t2v, b1v),
            grid_index=torch.as_tensor(index, device=dev),
        )
        log.info("dictionary: %d atoms simulated in %.2f s", len(T1), elapsed)
        if rank is not None or energy is not None:
            d.compress(rank=rank, energy=energy)
        if not keep_atoms:
            d.atoms = None
        return d

    def compress(self, *, rank: int | None = None, energy: float | None = 0.9999) -> Dictionary:
        """SVD-compress the time axis (McGivney et al. 2014); returns self."""
        if self.atoms is None:
            raise ParameterError(
                "compress needs the full atoms (the dictionary was built with keep_atoms=False)"
            )
        A = self.atoms
        n_tr = A.shape[1]
        gram = torch.zeros((n_tr, n_tr), dtype=torch.complex128, device=A.device)
        for i in range(0, A.shape[0], 16384):
            blk = A[i : i + 16384].to(torch.complex128)
            gram += blk.conj().T @ blk
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        frac = torch.cumsum(evals, 0) / evals.sum()
        if rank is None:
            if energy is None or not 0 < energy <= 1:
                raise ParameterError(f"energy must be in (0, 1], got {energy}")
            rank = (
                int(
                    torch.searchsorted(
                        frac, torch.tensor(energy, dtype=frac.dtype, device=frac.device)
                    ).item()
                )
                + 1
            )
        if not 1 <= rank <= n_tr:
            raise ParameterError(f"rank must be in [1, {n_tr}], got {rank}")
        basis = evecs[:, :rank].to(A.dtype)
        # atoms are rows; the coefficient of row a on basis vector v is ⟨v, a⟩ = vᴴa = a @ conj(v)
        c = A @ basis.conj()
        cn = torch.linalg.vector_norm(c, dim=1)
        self.basis = basis
        self.coeffs = c / cn.clamp_min(1e-30)[:, None]
        self.coeff_norms = (cn * self.norms).to(self.norms.dtype)
        self.energy = float(frac[rank - 1])
        self.info["rank"] = rank
        return self

    # -- properties ------------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return int(self.t1.numel())

    @property
    def rank(self) -> int | None:
        return None if self.basis is None else int(self.basis.shape[1])

    @property
    def b1_values(self) -> torch.Tensor:
        return torch.unique(self.b1)

    def to(self, device: Any) -> Dictionary:
        dev = torch.device(device)
        mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
        return Dictionary(
            mv(self.t1),
            mv(self.t2),
            mv(self.b1),
            mv(self.atoms),
            mv(self.norms),
            self.schedule,
            mv(self.basis),
            mv(self.coeffs),
            mv(self.coeff_norms),
            self.energy,
            dict(self.info),
        )

    def neighbours(self) -> torch.Tensor | None:
        """Atom index of the −/+ neighbour along T1 and T2 for every atom, ``(N, 4)``
        (columns T1−, T1+, T2−, T2+; −1 where the grid has no neighbour), or None without a grid."""
        if self.grid is None or self.grid_index is None:
            return None
        n1, n2, nb = (len(a) for a in self.grid)
        lut = torch.full((n1 + 2, n2 + 2, nb), -1, dtype=torch.long, device=self.grid_index.device)
        gi = self.grid_index
        lut[gi[:, 0] + 1, gi[:, 1] + 1, gi[:, 2]] = torch.arange(gi.shape[0], device=gi.device)
        i1, i2, ib = gi[:, 0] + 1, gi[:, 1] + 1, gi[:, 2]
        return torch.stack(
            [lut[i1 - 1, i2, ib], lut[i1 + 1, i2, ib], lut[i1, i2 - 1, ib], lut[i1, i2 + 1, ib]], 1
        )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Subspace coefficients of time courses ``x (..., n_tr)``."""
        if self.basis is None:
            raise ParameterError("the dictionary is not compressed; call compress() first")
        return x.to(self.basis.dtype) @ self.basis.conj()

    def expand(self, c: torch.Tensor) -> torch.Tensor:
        """Time courses from subspace coefficients ``c (..., rank)``."""
        if self.basis is None:
            raise ParameterError("the dictionary is not compressed; call compress() first")
        return c.to(self.basis.dtype) @ self.basis.T

    # -- storage ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write to ``.npz`` (atoms included if kept)."""
        p = Path(path)
        s = self.schedule
        arrays = {
            "t1": self.t1.cpu().numpy(),
            "t2": self.t2.cpu().numpy(),
            "b1": self.b1.cpu().numpy(),
            "norms": self.norms.cpu().numpy(),
            "flip_angles": s.flip_angles,
            "tr": s.tr,
            "te": s.te,
            "phase": s.phase,
            "inversion": np.array(s.inversion),
            "ti": np.array(s.ti),
            "energy": np.array(np.nan if self.energy is None else self.energy),
        }
        for name in ("atoms", "basis", "coeffs", "coeff_norms", "grid_index"):
            t = getattr(self, name)
            if t is not None:
                arrays[name] = t.cpu().numpy()
        if self.grid is not None:
            arrays.update(grid_t1=self.grid[0], grid_t2=self.grid[1], grid_b1=self.grid[2])
        np.savez(p, **arrays)
        return p if p.suffix == ".npz" else p.with_suffix(p.suffix + ".npz")

    @classmethod
    def load(cls, path: str | Path, *, device: Any = None) -> Dictionary:
        """Read a dictionary written by :meth:`save`."""
        p = Path(path)
        if not p.exists():
            raise DataFileError(f"dictionary file not found: {p}")
        try:
            z = np.load(p)
            sched = Schedule(
                z["flip_angles"],
                z["tr"],
                z["te"],
                z["phase"],
                inversion=bool(z["inversion"]),
                ti=float(z["ti"]),
            )
            dev = resolve_device(device)
            get = lambda k: torch.as_tensor(z[k], device=dev) if k in z else None  # noqa: E731
            energy = float(z["energy"])
            return cls(
                get("t1"),
                get("t2"),
                get("b1"),
                get("atoms"),
                get("norms"),
                sched,
                get("basis"),
                get("coeffs"),
                get("coeff_norms"),
                None if math.isnan(energy) else energy,
            )
        except (KeyError, ValueError, OSError) as exc:
            raise DataFileError(f"{p} is not a qmrkit MRF dictionary: {exc}") from exc
