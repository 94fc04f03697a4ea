"""DWI → diffusion maps: one function, :func:`diffusion_maps`, for the CLI, the service and scripts.

What a model is fitted to comes from its registry entry
(:class:`~qmrkit.models.registry.DiffusionSpec`):

* ``"series"`` models (DTI) are fitted to the DWI volumes with the b-vectors in FSL's frame
  (``DWI.bvecs``, as FSL's ``dtifit``), so eigenvector maps are in that frame;
* ``"invariants"`` models (NEXI; AxCaliberSMT and SANDI when registered) are fitted, voxel by
  voxel, to the rotational invariants of every shell (b, δ, Δ), computed over the mask only and
  normalised by the mean b = 0 signal (:func:`~qmrkit.models.diffusion.rotational_invariants`).

Voxels of the mask whose mean b = 0 signal is not positive cannot be normalised; they are left out
with a warning. Maps come back as a :class:`DiffusionMaps`, whose :meth:`~DiffusionMaps.save` writes
BIDS-style NIfTI maps with JSON sidecars (units, provenance) in the DWI's geometry.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import fit
from ..errors import NonFiniteWarning, ParameterError, ShapeError
from ..fit.model import Model
from ..io.dwi import DWI
from ..models.diffusion import Invariants, rotational_invariants
from ..models.registry import DWI_TIMING, diffusion_spec
from .masking import resolve_mask

SOLVERS = ("lm", "adam", "mcmc", "dictionary")

#: GACELLE's MCMC settings (paper 004, table 1, demo 2 AxCaliberSMT) as :func:`qmrkit.fit.mcmc`
#: options: 10 % burn-in, thinning 100, and 900 posterior samples per voxel — MH: 4 independent
#: chains ("proposals") × 25,000 iterations (4 × 22,500/100 = 900); ensemble: 50 walkers × 2,000
#: iterations (50 × 1,800/100 = 900). The table gives no MH proposal widths: qmrkit's MH keeps
#: its own (Laplace-correlated, adapted during burn-in; :func:`qmrkit.fit.mcmc`).
MCMC_PRESETS: dict[str, dict[str, Any]] = {
    "gacelle-mh": {"method": "mh", "n_walkers": 4, "n_steps": 25000, "burnin": 0.1, "thin": 100},
    "gacelle-ensemble": {
        "method": "ensemble",
        "n_walkers": 50,
        "n_steps": 2000,
        "burnin": 0.1,
        "thin": 100,
    },
}

#: voxels per chunk of the invariants computation (bounds its float64 working set)
INVARIANT_CHUNK = 16384


@dataclass
class DiffusionMaps:
    """Maps of a diffusion model fitted to a DWI (see :func:`diffusion_maps`).

    Attributes
    ----------
    result : FitResult or McmcResult
        The solver's result (maps in the DWI's spatial shape, physical units).
    model : Model
        The model as fitted (its acquisition: b-values and gradients, or shells).
    name, solver : str
        Registry name of the model and the solver used.
    fitted : ndarray (*spatial, n_meas)
        What was fitted: the DWI volumes, or the invariants (shell by shell, each shell's orders).
    invariants : Invariants or None
        The rotational invariants (``"invariants"`` models).
    mask : ndarray bool (*spatial)
        Voxels fitted.
    provenance : dict
        What the sidecars record about the fit (model, solver, fitted measurements, TV, ...).
    """

    result: Any
    model: Model
    name: str
    solver: str
    fitted: np.ndarray = field(repr=False)
    invariants: Invariants | None
    mask: np.ndarray = field(repr=False)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """Fitted maps (posterior means for MCMC), name -> tensor (*spatial)."""
        return self.result.mean if isinstance(self.result, fit.McmcResult) else self.result.maps

    def summary(self) -> str:
        return self.result.summary()

    def save(
        self,
        directory: str | Path,
        *,
        affine: Any = None,
        like: Any = None,
        prefix: str = "",
        extra_sidecar: Mapping[str, Any] | None = None,
    ) -> list[Path]:
        """Write every map as ``<prefix><name>.nii.gz`` (BIDS-style names: ``FA``, ``MD``,
        ``fn``, ``tex``, ...; MCMC: ``_mean``/``_std``/``_median``) with a JSON sidecar holding
        its unit and the provenance, plus ``fit.json`` (``mcmc.json``); DTI also gets ``V1``, the
        principal eigenvector as one (*spatial, 3) image as FSL writes it.

        Parameters
        ----------
        directory : path
            Output folder.
        affine, like :
            Geometry of the DWI (``DWI.affine``, ``DWI.header``): maps keep its affine and its
            qform/sform codes.
        prefix : str
            Prepended to every file name.
        extra_sidecar : dict, optional
            More provenance (input files, ...), added to every sidecar.
        """
        from ..io.nifti import jsonable, save_map

        extra = {**self.provenance, **dict(extra_sidecar or {})}
        if isinstance(self.result, fit.McmcResult):
            written = self.result.save(directory, affine=affine, like=like, prefix=prefix)
            # McmcResult.save records model and solver only: add the provenance to its sidecars
            for p in written:
                if p.suffix == ".json":
                    side = json.loads(p.read_text())
                    side.update(jsonable(extra))
                    p.write_text(json.dumps(side, indent=2))
            return written
        written = self.result.save(
            directory, affine=affine, like=like, prefix=prefix, extra_sidecar=extra
        )
        maps = self.result.maps
        if all(f"V1{c}" in maps for c in "xyz"):
            v1 = torch.stack([maps[f"V1{c}"] for c in "xyz"], dim=-1)
            written += save_map(
                directory,
                f"{prefix}V1",
                v1,
                unit="",
                description="principal eigenvector (x, y, z components in the frame of the "
                f"b-vectors: {self.provenance.get('BvecFrame', 'fsl')})",
                affine=affine,
                like=like,
                provenance={"Model": self.name, "Solver": self.solver, **jsonable(extra)},
            )
        return written


# -------------------------------------------------------------------------------------------------
# checks (usable before any data is read)
# -------------------------------------------------------------------------------------------------
def check_request(
    model: str,
    *,
    solver: str = "lm",
    tv: Any = None,
    has_small_delta: bool = True,
    has_big_delta: bool = True,
    mcmc_preset: str | None = None,
) -> None:
    """Raise one clear error for a request that cannot run: unknown diffusion model or solver,
    TV with a solver other than adam, an MCMC preset without ``solver="mcmc"`` or unknown, timing
    (δ, Δ) the model needs but the files lack.

    Parameters
    ----------
    model : str
        Registry name (``"dti"``, ``"nexi"``, ...).
    solver : str
        One of :data:`SOLVERS`.
    tv : float, mapping or None
        As in :func:`diffusion_maps`.
    has_small_delta, has_big_delta : bool
        Whether the DWI has δ / Δ for every volume.
    mcmc_preset : str, optional
        A key of :data:`MCMC_PRESETS`.
    """
    spec = diffusion_spec(model)
    if solver not in SOLVERS:
        raise ParameterError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if tv is not None and solver != "adam":
        raise ParameterError("total variation (--tv) applies to --solver adam only")
    if mcmc_preset is not None:
        if mcmc_preset not in MCMC_PRESETS:
            raise ParameterError(
                f"MCMC preset must be one of {', '.join(MCMC_PRESETS)}, got {mcmc_preset!r}"
            )
        if solver != "mcmc":
            raise ParameterError(
                f"the MCMC preset (--mcmc-preset {mcmc_preset}) applies to --solver mcmc only"
            )
    have = {"small_delta": has_small_delta, "big_delta": has_big_delta}
    missing = [n for n in spec.needs if not have[n]]
    if missing:
        raise ParameterError(
            f"model {model!r} needs the " + "; and the ".join(DWI_TIMING[n] for n in missing)
        )


def example_model(model: str) -> Model:
    """The model built for a small example protocol (3 Δ, 2 shells each, 16 directions): its
    parameters (names, bounds, units) are those of any real fit (for ``qmrkit models`` and for
    checking names such as ``--tv fn:...`` before data are read)."""
    from ..sim.diffusion import dwi_protocol

    spec = diffusion_spec(model)
    prot = dwi_protocol(((13.0, (1.0, 2.5)), (21.0, (1.0, 2.5)), (30.0, (1.0, 2.5))), n_dirs=16)
    if spec.fit_to == "series":
        dwi = DWI(
            data=np.zeros((1, 1, 1, prot.n_volumes), np.float32),
            affine=np.eye(4),
            bvals=prot.bvals,
            bvecs=prot.bvecs,
            small_delta=prot.small_delta,
            big_delta=prot.big_delta,
        )
        return spec.cls.from_dwi(dwi, **spec.fixed)
    inv = rotational_invariants(
        np.ones((1, prot.n_volumes)),
        prot.bvals,
        prot.bvecs,
        small_delta=prot.small_delta,
        big_delta=prot.big_delta,
        l_max=spec.l_max,
    )
    return spec.cls.from_invariants(inv, **spec.fixed)


def tv_regularizers(model: Model, tv: Any, dims: int | None = None) -> list[fit.Regularizer]:
    """Total-variation terms for ``fit.adam`` from a user's request.

    Parameters
    ----------
    model : Model
        The model fitted (its parameter and map names).
    tv : float, mapping, sequence of (name or None, λ) pairs, or None
        A bare λ (or a pair with name None): one joint TV over every non-amplitude parameter, as
        ``qmrkit fit --tv LAMBDA``. A name (parameter or map name, e.g. NEXI's ``fn`` for ``f``)
        with λ: a term λ·TV(that parameter). Zero weights add nothing.
    dims : {2, 3}, optional
        In-plane or volumetric TV (default: all image axes).

    Returns
    -------
    list of TotalVariation
    """
    if tv is None:
        return []
    if isinstance(tv, Mapping):
        pairs = list(tv.items())
    elif isinstance(tv, (int, float)):
        pairs = [(None, tv)]
    else:
        pairs = [tuple(t) for t in tv]
    names = [p.name for p in model.parameters if not p.amplitude]
    by_map = {v: k for k, v in model.map_names.items() if k in names}
    regs: list[fit.Regularizer] = []
    for key, lam in pairs:
        lam = float(lam)
        if not lam >= 0:
            raise ParameterError(f"--tv {key or ''}: the weight must be >= 0, got {lam}")
        if key is None:
            target: str | list[str] = names
        elif key in names or key in by_map:
            target = key if key in names else by_map[key]
        else:
            known = ", ".join(sorted({*names, *by_map}))
            raise ParameterError(
                f"--tv {key}:{lam:g}: {model.name} has no parameter {key!r}; parameters: {known}"
            )
        if lam > 0:
            regs.append(fit.TotalVariation(target, lam, dims=dims))
    return regs


def check_timing(
    bvals: Any, timing: Mapping[str, Any], needs: tuple[str, ...], b0_threshold: float
) -> None:
    """The δ/Δ a model needs (``needs``) must be > 0 ms for every diffusion-weighted volume."""
    dw = np.asarray(bvals, dtype=np.float64) > b0_threshold
    for name in needs:
        values = timing.get(name)
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float64)
        bad = np.flatnonzero(dw & ~(values > 0))
        if bad.size:
            raise ParameterError(
                f"{name} must be > 0 ms for every diffusion-weighted volume; volumes "
                f"{bad[:10].tolist()} have {values[bad[:10]].tolist()}"
            )


# -------------------------------------------------------------------------------------------------
# the pipeline
# -------------------------------------------------------------------------------------------------
def _masked_invariants(dwi: DWI, mask: np.ndarray, l_max: int) -> Invariants:
    """Rotational invariants of the mask's voxels only (NaN elsewhere), in chunks of voxels."""
    idx = np.flatnonzero(mask.reshape(-1))
    flat = dwi.data.reshape(-1, dwi.n_volumes)
    parts, first = [], None
    for s in range(0, idx.size, INVARIANT_CHUNK):
        inv = rotational_invariants(
            flat[idx[s : s + INVARIANT_CHUNK]],
            dwi.bvals,
            dwi.bvecs,
            small_delta=dwi.small_delta,
            big_delta=dwi.big_delta,
            l_max=l_max,
            b0_threshold=dwi.b0_threshold,
        )
        if first is None:
            first = inv
        parts.append(inv)
    values = np.full((flat.shape[0], *first.values.shape[1:]), np.nan)
    values[idx] = np.concatenate([p.values for p in parts])
    b0 = np.full(flat.shape[0], np.nan)
    b0[idx] = np.concatenate([p.mean_b0 for p in parts])
    spatial = mask.shape
    return Invariants(
        values=values.reshape(*spatial, *values.shape[1:]),
        orders=first.orders,
        b=first.b,
        small_delta=first.small_delta,
        big_delta=first.big_delta,
        mean_b0=b0.reshape(spatial),
    )


def diffusion_maps(
    dwi: DWI,
    model: str = "nexi",
    *,
    mask: Any = None,
    solver: str = "lm",
    tv: float | Mapping[str, float] | None = None,
    tv_dims: int | None = None,
    loss: str | None = None,
    max_iter: int | None = None,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
    solver_options: Mapping[str, Any] | None = None,
    mcmc_preset: str | None = None,
) -> DiffusionMaps:
    """Fit a registered diffusion model to a DWI (module docs).

    Parameters
    ----------
    dwi : DWI
        From :func:`qmrkit.io.load_dwi` (data (x, y, z, n), bvals ms/µm², bvecs FSL frame, δ/Δ ms).
    model : str
        ``"dti"``, ``"nexi"`` or another name registered with
        :func:`~qmrkit.models.registry.register_diffusion`.
    mask : array bool (x, y, z), "auto", "none" or None
        Voxels to fit (always only those with a positive mean b = 0 signal). ``"auto"``: the
        object found by :func:`qmrkit.pipelines.masking.object_mask` on the DWI volumes
        (recorded in the sidecars under ``Mask``); None or ``"none"`` (default): every voxel.
    solver : {"lm", "adam", "mcmc", "dictionary"}
        :func:`~qmrkit.fit.lm` (default), :func:`~qmrkit.fit.adam` (whole volume, L1 loss by
        default as GACELLE's askadam), :func:`~qmrkit.fit.mcmc` (posterior mean/std maps),
        :func:`~qmrkit.fit.dictionary_search`.
    tv : float, {name: λ} or sequence of (name or None, λ), optional
        Total variation for ``adam`` (:func:`tv_regularizers`): a bare λ regularises every
        parameter jointly; ``{"fn": 1e-3, "rn": 1e-3}`` adds λ·TV of each named parameter (or map)
        on its [0, 1]-normalised map, differences over unit voxel steps.
    tv_dims : {2, 3}, optional
        In-plane (2) or volumetric (3) TV; default: all image axes.
    loss : {"l1", "l2", "huber"}, optional
        ``adam``'s loss (default ``"l1"``).
    max_iter : int, optional
        ``lm``/``adam`` iterations; ``mcmc`` steps.
    device, dtype, progress :
        As for the solvers (``dtype=torch.float64`` for reference-quality fits).
    solver_options : dict, optional
        More keyword arguments for the solver (e.g. ``{"method": "mh"}`` for mcmc).
    mcmc_preset : {"gacelle-mh", "gacelle-ensemble"}, optional
        ``solver="mcmc"`` only: GACELLE's table-1 sampler settings (:data:`MCMC_PRESETS`);
        ``solver_options`` override single settings and ``max_iter`` the steps.

    Returns
    -------
    DiffusionMaps
    """
    spec = diffusion_spec(model)
    check_request(
        model,
        solver=solver,
        tv=tv,
        has_small_delta=dwi.small_delta is not None,
        has_big_delta=dwi.big_delta is not None,
        mcmc_preset=mcmc_preset,
    )
    if loss is not None and solver != "adam":
        raise ParameterError("loss (--loss) applies to --solver adam only")
    timing = {"small_delta": dwi.small_delta, "big_delta": dwi.big_delta}
    check_timing(dwi.bvals, timing, spec.needs, dwi.b0_threshold)
    spatial = dwi.data.shape[:-1]
    mask, auto = resolve_mask(mask, dwi.data)
    if mask is None:
        sel = np.ones(spatial, dtype=bool)
    else:
        sel = np.asarray(mask).astype(bool)
        if sel.shape != spatial:
            raise ShapeError(f"mask has shape {sel.shape} but the DWI's images are {spatial}")
    b0 = dwi.mean_b0()
    bad = sel & ~(b0 > 0)
    if bad.any():
        warnings.warn(
            f"{int(bad.sum())} voxel(s) of the mask have a mean b = 0 signal <= 0 and are not "
            "fitted (the signal is normalised by it)",
            NonFiniteWarning,
            stacklevel=2,
        )
        sel = sel & (b0 > 0)
    if not sel.any():
        raise ParameterError(
            "no voxel to fit: every voxel of the mask has a mean b = 0 signal <= 0"
        )
    inv = None
    if spec.fit_to == "series":
        m = spec.cls.from_dwi(dwi, **spec.fixed)
        data = dwi.data
        provenance: dict[str, Any] = {"FittedTo": "DWI volumes", "BvecFrame": "fsl"}
    else:
        inv = _masked_invariants(dwi, sel, spec.l_max)
        m = spec.cls.from_invariants(inv, **spec.fixed)
        orders = tuple(getattr(m, "orders", (0,)))
        cols = [inv.orders.index(o) for o in orders]
        data = inv.values[..., cols].reshape(*spatial, -1)
        provenance = {
            "FittedTo": "rotational invariants per shell, normalised by the mean b = 0 signal",
            "InvariantOrders": list(orders),
            "Shells": {
                "b_ms_per_um2": inv.b,
                "small_delta_ms": inv.small_delta,
                "big_delta_ms": inv.big_delta,
            },
        }
    regs = tv_regularizers(m, tv, tv_dims)
    opts = {**MCMC_PRESETS.get(mcmc_preset or "", {}), **dict(solver_options or {})}
    common = {"mask": sel, "device": device, "dtype": dtype}
    if solver == "lm":
        if max_iter is not None:
            opts["max_iter"] = max_iter
        result = fit.lm(m, data, progress=progress, **common, **opts)
    elif solver == "adam":
        if max_iter is not None:
            opts["max_iter"] = max_iter
        opts.setdefault("loss", loss or "l1")
        result = fit.adam(m, data, regularizers=regs, progress=progress, **common, **opts)
    elif solver == "mcmc":
        if max_iter is not None:
            opts["n_steps"] = max_iter
        result = fit.mcmc(m, data, progress=progress, **common, **opts)
    else:
        result = fit.dictionary_search(m, data, **common, **opts)
    provenance.update({"Model": model, "Solver": solver, "DataType": str(dtype).split(".")[-1]})
    if mcmc_preset is not None:
        provenance["McmcPreset"] = {
            "name": mcmc_preset,
            "settings": MCMC_PRESETS[mcmc_preset],
            "source": "paper 004 (GACELLE) table 1",
        }
    if auto is not None:
        provenance["Mask"] = auto.sidecar()
    if regs:
        provenance["TotalVariation"] = {
            "terms": [
                {"parameters": list(r.params), "weight": r.weight, "dims": r.dims} for r in regs
            ],
            "note": "λ·TV of the [0, 1]-normalised parameter maps, unit voxel steps",
        }
    return DiffusionMaps(
        result=result,
        model=m,
        name=model,
        solver=solver,
        fitted=np.asarray(data),
        invariants=inv,
        mask=sel,
        provenance=provenance,
    )
