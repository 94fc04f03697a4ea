"""``ReconResult``: what every reconstruction returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class ReconResult:
    """A reconstructed image with its diagnostics.

    Attributes
    ----------
    image : torch.Tensor
        Complex image ``(*batch, *spatial)`` (RSS gridding gives a real magnitude image).
    method : str
        ``"sense"``, ``"tv"``, ``"gridding"`` or ``"sgd"``.
    iterations : int
        Solver iterations run (0 for direct methods).
    residual_history : list of float
        The solver's stopping quantity per iteration (see :mod:`qmrkit.optim`).
    converged : bool
        Whether the stopping criterion was met before ``max_iter``.
    elapsed_s : float
        Wall-clock seconds of the reconstruction (operator set-up included).
    settings : dict
        Parameters used (λ, max_iter, tol, NUFFT choices, ...), JSON-serialisable.
    objective_history : list of float
        Objective values per iteration where the solver provides them.
    """

    image: torch.Tensor
    method: str
    iterations: int = 0
    residual_history: list[float] = field(default_factory=list)
    converged: bool = True
    elapsed_s: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    objective_history: list[float] = field(default_factory=list)
    n_spatial: int | None = None

    @property
    def magnitude(self) -> torch.Tensor:
        """``|image|`` (real)."""
        return self.image.abs() if self.image.is_complex() else self.image

    def summary(self) -> str:
        """One line: method, shape, iterations, final residual, time."""
        last = f"{self.residual_history[-1]:.2e}" if self.residual_history else "-"
        return (
            f"{self.method}: image {tuple(self.image.shape)}, {self.iterations} iterations, "
            f"final residual {last}, converged={self.converged}, {self.elapsed_s:.2f} s"
        )

    def to_nifti_order(self, a: np.ndarray | None = None) -> np.ndarray:
        """An image ``(*batch, [z,] y, x)`` as a NIfTI-ordered array ``(x, y[, z], *batch)``:
        spatial axes reversed, y flipped so that the first row (anterior) gets the largest y
        index, batch (frames/echoes) last as :func:`qmrkit.fit` expects."""
        arr = self.image.detach().cpu().numpy() if a is None else a
        n_sp = self.n_spatial or min(arr.ndim, 3)
        n_b = arr.ndim - n_sp
        arr = np.flip(arr, axis=arr.ndim - 2)
        perm = list(range(arr.ndim - 1, n_b - 1, -1)) + list(range(n_b))
        return np.ascontiguousarray(arr.transpose(perm))

    def save(
        self, directory: str | Path, *, name: str = "recon", affine: Any = None, png: bool = True
    ) -> list[Path]:
        """Write ``{name}_mag.nii.gz`` (magnitude), ``{name}_phase.nii.gz`` (radians, complex
        images only), ``{name}.json`` (settings and diagnostics) and ``{name}.png``.

        NIfTI arrays are in NIfTI order ``(x, y[, z], *batch)`` (see :meth:`to_nifti_order`);
        ``affine`` (4×4, mm) maps those voxel indices to positions.

        Returns the paths written.
        """
        from ..io.nifti import jsonable, save_nifti

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        img = self.image.detach().cpu()
        mag = self.to_nifti_order(img.abs().float().numpy())
        out = [save_nifti(d / f"{name}_mag.nii.gz", mag, affine=affine)]
        if img.is_complex():
            out.append(
                save_nifti(
                    d / f"{name}_phase.nii.gz",
                    self.to_nifti_order(img.angle().float().numpy()),
                    affine=affine,
                )
            )
        side = {
            "method": self.method,
            "shape": list(img.shape),
            "iterations": self.iterations,
            "converged": self.converged,
            "elapsed_s": self.elapsed_s,
            "residual_history": [float(v) for v in self.residual_history],
            "objective_history": [float(v) for v in self.objective_history],
            "settings": jsonable(self.settings),
        }
        p = d / f"{name}.json"
        p.write_text(json.dumps(side, indent=2))
        out.append(p)
        if png:
            from ..io.figures import save_map_figure

            while mag.ndim > 3:  # first frame/echo of a batch
                mag = mag[..., 0]
            out.append(
                save_map_figure(
                    d / f"{name}.png",
                    {"magnitude": mag},
                    ranges={"magnitude": (0.0, float(np.percentile(mag, 99.5)) or 1.0)},
                    title=f"{self.method} reconstruction",
                )
            )
        return out
