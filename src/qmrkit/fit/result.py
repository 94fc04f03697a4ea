"""Results of a fit: parameter maps in image shape plus diagnostics, savable as NIfTI."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .model import Model
    from .problem import Problem


@dataclass
class FitResult:
    """Parameter maps and diagnostics of a fit.

    Attributes
    ----------
    maps : dict of str -> Tensor
        Fitted parameters and derived quantities, each in image shape, in physical units (amplitudes
        in data units). Voxels outside the mask (or excluded as non-finite) are NaN.
    final_maps : dict of str -> Tensor or None
        For iterative gradient solvers: the last iterate (``maps`` holds the minimum-loss iterate).
    residual : Tensor
        Root-mean-square residual per voxel in data units (image shape).
    converged : Tensor
        Boolean map: the voxel met a convergence criterion.
    iterations : Tensor or int
        Iterations per voxel (``lm``) or in total (``adam``).
    loss_history : list of float
        Objective per iteration (``lm``: mean cost of the voxels still iterating; ``adam``: the loss).
    mask : Tensor
        Voxels that were fitted.
    elapsed_s : float
        Wall time of the fit.
    solver : str
        ``"lm"``, ``"adam"``, ``"dictionary_search"``, ...
    settings : dict
        Solver options, for the JSON sidecar.
    units : dict of str -> str
        Unit of each map.
    """

    maps: dict[str, torch.Tensor]
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor | int
    loss_history: list[float]
    mask: torch.Tensor
    elapsed_s: float
    solver: str
    model_name: str
    settings: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    map_names: dict[str, str] = field(default_factory=dict)
    final_maps: dict[str, torch.Tensor] | None = None
    n_excluded: int = 0

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_theta(
        cls,
        problem: Problem,
        theta: torch.Tensor,
        *,
        solver: str,
        converged: torch.Tensor,
        iterations: torch.Tensor | int,
        loss_history: list[float],
        elapsed_s: float,
        settings: dict[str, Any] | None = None,
        final_theta: torch.Tensor | None = None,
    ) -> FitResult:
        model = problem.model
        maps = _maps_from_theta(problem, theta)
        final_maps = _maps_from_theta(problem, final_theta) if final_theta is not None else None
        with torch.no_grad():
            r = problem.residual(theta)
            rms = r.pow(2).mean(dim=-1).sqrt() * problem.scale
        units = {p.name: p.unit for p in model.parameters}
        units.update(getattr(model, "derived_units", {}) or {})
        its = iterations if isinstance(iterations, int) else problem.to_map(iterations, fill=0)
        return cls(
            maps=maps,
            residual=problem.to_map(rms.to(theta.dtype)),
            converged=problem.to_map(converged),
            iterations=its,
            loss_history=[float(x) for x in loss_history],
            mask=problem.to_map(
                torch.ones(problem.n_voxels, dtype=torch.bool, device=theta.device)
            ),
            elapsed_s=float(elapsed_s),
            solver=solver,
            model_name=model.name,
            settings=dict(settings or {}),
            units=units,
            map_names=dict(model.map_names),
            final_maps=final_maps,
            n_excluded=problem.n_nonfinite,
        )

    # -- access ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.maps[name]
        except KeyError:
            raise KeyError(f"no map {name!r}; available: {sorted(self.maps)}") from None

    def numpy(self) -> dict[str, np.ndarray]:
        """All maps as NumPy arrays (on the CPU)."""
        return {k: v.detach().cpu().numpy() for k, v in self.maps.items()}

    @property
    def n_voxels(self) -> int:
        return int(self.mask.sum())

    @property
    def fraction_converged(self) -> float:
        return float(self.converged[self.mask].float().mean()) if self.n_voxels else math.nan

    def summary(self) -> str:
        """A short text summary: solver, voxels, time, convergence and map medians."""
        lines = [
            f"{self.model_name} fitted by {self.solver}: {self.n_voxels} voxels in "
            f"{self.elapsed_s:.3f} s ({self.n_voxels / max(self.elapsed_s, 1e-12):,.0f} voxels/s), "
            f"{100 * self.fraction_converged:.1f}% converged"
        ]
        if self.n_excluded:
            lines.append(f"  {self.n_excluded} non-finite voxel(s) excluded")
        for k, v in self.maps.items():
            vals = v[self.mask]
            vals = vals[torch.isfinite(vals)]
            if vals.numel():
                q = torch.quantile(
                    vals.double()[:: max(1, vals.numel() // 100000)],
                    torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64),
                )
                lines.append(
                    f"  {k:<10} median {q[1]:.4g} {self.units.get(k, '')} "
                    f"(5-95%: {q[0]:.4g} to {q[2]:.4g})"
                )
        return "\n".join(lines)

    # -- output ---------------------------------------------------------------------------------
    def save(
        self,
        directory: str | Path,
        *,
        affine: Any = None,
        like: Any = None,
        prefix: str = "",
        extra_sidecar: dict[str, Any] | None = None,
    ) -> list[Path]:
        """Write each map as NIfTI with BIDS-style names, a JSON sidecar per map and ``fit.json``.

        Parameters
        ----------
        directory : path
            Output folder (created if missing).
        affine : (4, 4) array, optional
            Voxel-to-world matrix in mm (e.g. from the input NIfTI); default: that of ``like``,
            else identity (then marked unknown in the qform/sform codes).
        like : nibabel header, optional
            Header of the input series (``load_nifti(..., with_header=True)``): its qform/sform
            codes are kept.
        prefix : str
            Prepended to every file name (e.g. ``"sub-01_"``).
        extra_sidecar : dict, optional
            More provenance (input file, acquisition settings) for ``fit.json`` and every map's
            sidecar.

        Returns
        -------
        list of Path
            The files written.
        """
        from ..io.nifti import jsonable, save_map, software_versions

        out = Path(directory)
        extra = jsonable(dict(extra_sidecar or {}))
        provenance = {
            "Model": self.model_name,
            "Solver": self.solver,
            **({"Sources": [extra["Input"]]} if "Input" in extra else {}),
            **extra,
        }
        geometry = {"affine": affine, "like": like}
        written = []
        for name, m in self.maps.items():
            stem = self.map_names.get(name, name)
            unit = self.units.get(name, "")
            written += save_map(
                out,
                f"{prefix}{stem}",
                m,
                unit=unit,
                description=f"{name} of the {self.model_name} model",
                provenance=provenance,
                **geometry,
            )
        written += save_map(
            out,
            f"{prefix}residual",
            self.residual,
            unit="a.u.",
            description="root-mean-square residual per voxel (data units)",
            provenance=provenance,
            **geometry,
        )
        written += save_map(
            out,
            f"{prefix}converged",
            self.converged.to(torch.uint8),
            description="1 where the solver met its convergence test",
            provenance=provenance,
            **geometry,
        )
        sidecar = {
            "Model": self.model_name,
            "Solver": self.solver,
            "Settings": jsonable(self.settings),
            "Units": {self.map_names.get(k, k): u for k, u in self.units.items() if k in self.maps},
            "VoxelsFitted": self.n_voxels,
            "VoxelsExcludedNonFinite": self.n_excluded,
            "FractionConverged": self.fraction_converged,
            "ElapsedSeconds": self.elapsed_s,
            "FinalLoss": self.loss_history[-1] if self.loss_history else None,
            "Software": software_versions(),
            **extra,
        }
        path = out / f"{prefix}fit.json"
        path.write_text(json.dumps(sidecar, indent=2))
        written.append(path)
        return written


def _maps_from_theta(problem: Problem, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    model: Model = problem.model
    with torch.no_grad():
        phys = problem.to_physical(theta)
        maps = {k: problem.to_map(v) for k, v in phys.items()}
        cols = {k: v[:, None] for k, v in phys.items()}
        cols.update(problem.inputs)
        for k, v in model.derived(cols).items():
            v = v.reshape(problem.n_voxels)
            maps[k] = problem.to_map(v.to(theta.dtype))
    return maps
