"""Vectorised MCMC over all voxels at once: affine-invariant ensemble and Metropolis–Hastings.

Every voxel runs its own chains, but all voxels (and all walkers) advance together in one batched
log-posterior evaluation per move, on CPU or GPU. The same :class:`~qmrkit.fit.Model` as the
optimisers is used; the posterior is

    log p(θ, σ | d) = log L(d | θ, σ) + log prior(θ) [+ log prior(σ)]

with uniform priors inside the parameter bounds (proposals outside are rejected), optional user
log-priors, Gaussian or Rician likelihood, and the noise σ either sampled (flat in log σ, i.e. the
Jeffreys prior), fixed, or given as a map.

Random numbers are drawn from a seeded CPU generator and moved to the device, so the same seed gives
the same chains on every device (up to floating-point differences of the model evaluation).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._progress import get_logger, progress_bar
from ..errors import BoundsError, ConvergenceWarning, ParameterError, ShapeError
from .lm import lm, residual_and_jacobian
from .problem import Problem, make_problem
from .result import _jsonable

log = get_logger("fit.mcmc")

METHODS = ("ensemble", "mh")
LIKELIHOODS = ("gaussian", "rician")
_LOG_SIGMA_RANGE = (math.log(1e-5), math.log(10.0))  # internal units (data scale = 1)
MAX_TAU_STEPS = 1024
MAX_QUANTILE_SAMPLES = 4096


@dataclass
class McmcResult:
    """Posterior summaries per voxel, as maps in image shape (physical units).

    Attributes
    ----------
    mean, std, median : dict of str -> Tensor
        Posterior mean, standard deviation and median of each parameter (and derived quantity, and
        ``sigma`` when the noise was sampled).
    quantiles : dict of float -> dict of str -> Tensor
        Requested posterior quantiles.
    acceptance : Tensor
        Fraction of accepted proposals after burn-in, per voxel.
    tau : dict of str -> Tensor
        Integrated autocorrelation time per parameter, in stored (thinned) steps.
    ess : dict of str -> Tensor
        Effective sample size per parameter (all walkers or chains together).
    rhat : dict of str -> Tensor
        Gelman–Rubin potential scale reduction across walkers (ensemble) or chains (MH).
    samples : dict of str -> Tensor or None
        Thinned samples ``(*spatial, n_samples)`` when ``keep_samples=True``.
    mask : Tensor
        Voxels that were sampled.
    """

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    median: dict[str, torch.Tensor]
    quantiles: dict[float, dict[str, torch.Tensor]]
    acceptance: torch.Tensor
    tau: dict[str, torch.Tensor]
    ess: dict[str, torch.Tensor]
    rhat: dict[str, torch.Tensor]
    mask: torch.Tensor
    elapsed_s: float
    method: str
    model_name: str
    settings: dict[str, Any] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    map_names: dict[str, str] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] | None = None
    n_excluded: int = 0

    def summary(self) -> str:
        n = int(self.mask.sum())
        acc = self.acceptance[self.mask]
        lines = [
            f"{self.model_name} sampled by {self.method}: {n} voxels in {self.elapsed_s:.2f} s "
            f"({1000 * self.elapsed_s / max(n, 1):.3f} ms/voxel), acceptance median "
            f"{float(acc.median()):.2f}"
        ]
        for k in self.mean:
            m, s = self.mean[k][self.mask], self.std[k][self.mask]
            r = self.rhat.get(k)
            rtxt = f", R-hat median {float(r[self.mask].median()):.3f}" if r is not None else ""
            lines.append(
                f"  {k:<8} mean {float(m.median()):.4g} ± {float(s.median()):.3g} "
                f"{self.units.get(k, '')}{rtxt}"
            )
        return "\n".join(lines)

    def save(self, directory: str | Path, *, affine: Any = None, prefix: str = "") -> list[Path]:
        """Write ``<map>_mean``, ``_std``, ``_median`` NIfTI maps, acceptance and a JSON sidecar."""
        import json

        from ..io.nifti import save_nifti

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for stat, maps in (("mean", self.mean), ("std", self.std), ("median", self.median)):
            for k, v in maps.items():
                stem = self.map_names.get(k, k)
                written.append(save_nifti(out / f"{prefix}{stem}_{stat}.nii.gz", v, affine=affine))
        written.append(
            save_nifti(out / f"{prefix}acceptance.nii.gz", self.acceptance, affine=affine)
        )
        side = {
            "Model": self.model_name,
            "Method": self.method,
            "Settings": _jsonable(self.settings),
            "ElapsedSeconds": self.elapsed_s,
            "VoxelsSampled": int(self.mask.sum()),
        }
        p = out / f"{prefix}mcmc.json"
        p.write_text(json.dumps(side, indent=2))
        written.append(p)
        return written


# ------------------------------------------------------------------------------------------------
# the log-posterior
# ------------------------------------------------------------------------------------------------
class _Posterior:
    """Batched log-posterior of states ``x (n, D)`` belonging to voxels ``idx (n,)``."""

    def __init__(
        self,
        problem: Problem,
        *,
        likelihood: str,
        noise_mode: str,
        sigma: torch.Tensor | None,
        priors: Sequence[Callable] | None,
    ):
        self.p = problem
        self.P = problem.model.n_params
        self.likelihood = likelihood
        self.noise_mode = noise_mode  # "sample" | "fixed"
        self.sigma = sigma  # (V,) internal units when fixed
        self.priors = list(priors or [])
        self.n_res = problem.n_meas * (2 if problem.data.is_complex() else 1)
        if likelihood == "rician" and (problem.data.is_complex() or (problem.data < 0).any()):
            raise ParameterError(
                "the Rician likelihood is for magnitude data (real, non-negative); use "
                "likelihood='gaussian' for complex or signed data"
            )

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        p = self.p
        theta = x[:, : self.P]
        inside = ((theta >= p.lower) & (theta <= p.upper)).all(dim=1)
        if self.noise_mode == "sample":
            log_sigma = x[:, self.P]
            inside &= (log_sigma >= _LOG_SIGMA_RANGE[0]) & (log_sigma <= _LOG_SIGMA_RANGE[1])
            sigma = torch.exp(log_sigma)
        else:
            sigma = self.sigma[idx]
        safe = torch.where(inside[:, None], theta, p.clamp(theta))
        with torch.no_grad():
            pred = p.predict(safe, idx)
        d = p.data[idx]
        if self.likelihood == "gaussian":
            r = pred - d
            if p.weights is not None:
                r = r * p.weights[idx].sqrt()
            if r.is_complex():
                r = torch.view_as_real(r).flatten(-2)
            ll = -self.n_res * torch.log(sigma) - 0.5 * (r * r).sum(1) / (sigma * sigma)
        else:  # Rician, magnitude data d ≥ 0 with underlying amplitude ν = |pred|
            nu = pred.abs()
            s2 = (sigma * sigma)[:, None]
            z = d * nu / s2
            terms = torch.log(d.clamp_min(1e-30) / s2) - (d * d + nu * nu) / (2 * s2)
            terms = terms + torch.log(torch.special.i0e(z)) + z
            if p.weights is not None:
                terms = terms * p.weights[idx]
            ll = terms.sum(1)
        if self.priors:
            params = p.param_dict(safe, idx)
            for prior in self.priors:
                lp = prior(params)
                if not isinstance(lp, torch.Tensor):
                    raise ParameterError(
                        "a log-prior callable must return a torch.Tensor of shape (n,)"
                    )
                ll = ll + lp.reshape(-1)
        return torch.where(inside, ll, torch.full_like(ll, -math.inf))


# ------------------------------------------------------------------------------------------------
# random numbers: seeded on the CPU, moved to the device (identical chains on every device)
# ------------------------------------------------------------------------------------------------
class _Random:
    def __init__(self, seed: int | None, device: torch.device, dtype: torch.dtype):
        self.g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self.device, self.dtype = device, dtype

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.g, dtype=torch.float64).to(self.device, self.dtype)

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, dtype=torch.float64).to(self.device, self.dtype)


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------
def mcmc(
    model: Any,
    data: Any,
    *,
    mask: Any = None,
    weights: Any = None,
    method: str = "ensemble",
    n_walkers: int | None = None,
    n_steps: int = 2000,
    burnin: float | int = 0.1,
    thin: int = 1,
    step_size: float | Sequence[float] | None = None,
    noise: str | float | Any = "sample",
    likelihood: str = "gaussian",
    init: Any = None,
    priors: Sequence[Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] | None = None,
    quantiles: Sequence[float] = (0.025, 0.975),
    stretch: float = 2.0,
    target_acceptance: float = 0.3,
    seed: int | None = 0,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    memory_budget: int = 2 << 30,
    keep_samples: bool = False,
    progress: bool | None = None,
) -> McmcResult:
    """Sample the posterior of a model's parameters in every voxel at once.

    Parameters
    ----------
    model : Model
        Signal model (as for :func:`qmrkit.fit.lm`).
    data : array (*spatial, n_meas)
        Image series, measurement axis last.
    mask, weights : array, optional
        Voxels to sample; weights of the squared residuals (Gaussian) or log-terms (Rician).
    method : {"ensemble", "mh"}
        ``"ensemble"``: Goodman–Weare affine-invariant stretch move with red/blue half-ensemble
        updates; ``"mh"``: Metropolis–Hastings with per-parameter Gaussian proposal widths, adapted
        during burn-in toward ``target_acceptance`` and frozen afterwards (so the chain is valid).
    n_walkers : int, optional
        Ensemble: walkers per voxel, at least 2·D where D counts the parameters (plus σ when
        sampled); default max(2·D, 16), rounded up to even. MH: independent chains per voxel
        (default 4) used for R-hat.
    n_steps : int
        Steps per walker/chain, burn-in included.
    burnin : float or int
        Fraction of ``n_steps`` (< 1) or a number of steps discarded at the start.
    thin : int
        Keep every ``thin``-th step after burn-in.
    step_size : float or sequence, optional
        MH initial proposal widths in units of each parameter's Laplace posterior std (default
        2.38/√D); ignored by the ensemble.
    noise : "sample", float or array
        ``"sample"``: σ is a parameter (flat prior on log σ); a float: known σ in data units; an
        array of the image shape: a σ map.
    likelihood : {"gaussian", "rician"}
        Rician for magnitude images at low SNR.
    init : FitResult, optional
        Where walkers start (dispersed by the Laplace covariance). Default: an ``lm`` fit.
    priors : sequence of callables, optional
        Extra log-priors ``fn(params) -> (n,)`` with ``params`` a dict of ``(n, 1)`` physical values.
    quantiles : sequence of float
        Posterior quantiles to report (in (0, 1)).
    stretch : float
        Stretch-move scale a > 1 (Goodman & Weare: 2).
    seed : int
        Seed; the same seed gives the same chains on any device.
    device, dtype, batch_size, memory_budget, progress
        Compute placement, precision, voxels per chunk (default from ``memory_budget`` bytes for the
        stored traces) and progress bar.
    keep_samples : bool
        Return the thinned samples (memory grows with voxels × samples).

    Returns
    -------
    McmcResult
    """
    if method not in METHODS:
        raise ParameterError(f"method must be one of {METHODS}, got {method!r}")
    if likelihood not in LIKELIHOODS:
        raise ParameterError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if n_steps < 2:
        raise ParameterError(f"n_steps must be >= 2, got {n_steps}")
    if thin < 1 or int(thin) != thin:
        raise ParameterError(f"thin must be an integer >= 1, got {thin}")
    if isinstance(burnin, float) and not 0 <= burnin < 1:
        raise ParameterError(f"burnin as a fraction must be in [0, 1), got {burnin}")
    n_burn = int(round(burnin * n_steps)) if isinstance(burnin, float) else int(burnin)
    if not 0 <= n_burn < n_steps:
        raise ParameterError(f"burnin must leave steps to keep: burnin={burnin}, n_steps={n_steps}")
    n_keep = (n_steps - n_burn) // thin
    if n_keep < 2:
        raise ParameterError(f"only {n_keep} sample(s) would be kept; raise n_steps or lower thin")
    if stretch <= 1:
        raise ParameterError(f"stretch must be > 1, got {stretch}")
    if not 0 < target_acceptance < 1:
        raise ParameterError(f"target_acceptance must be in (0, 1), got {target_acceptance}")
    qs = tuple(float(q) for q in quantiles)
    if any(not 0 < q < 1 for q in qs):
        raise ParameterError(f"quantiles must lie in (0, 1), got {qs}")

    t0 = time.perf_counter()
    problem = make_problem(
        model, data, mask=mask, weights=weights, device=device, dtype=dtype, solver="mcmc"
    )
    P = problem.model.n_params
    noise_mode, sigma_fixed = _noise_setup(noise, problem)
    D = P + (1 if noise_mode == "sample" else 0)
    if method == "ensemble":
        W = max(2 * D, 16) if n_walkers is None else int(n_walkers)
        if W < 2 * D:
            raise ParameterError(
                f"the ensemble needs n_walkers >= 2·D = {2 * D} (D = {D} dimensions"
                f"{' incl. sigma' if noise_mode == 'sample' else ''}), got {W}"
            )
        W += W % 2
    else:
        W = 4 if n_walkers is None else int(n_walkers)
        if W < 1:
            raise ParameterError(f"n_walkers (chains) must be >= 1, got {W}")
    steps = _step_sizes(step_size, D)

    # start: an LM fit unless given; Laplace covariance for dispersion and MH proposal widths
    if init is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            init = lm(
                model,
                data,
                mask=mask,
                weights=weights,
                device=problem.device,
                dtype=dtype,
                progress=False,
            )
    maps = getattr(init, "maps", init)
    theta0 = problem.from_physical(maps, spatial=True)
    bad = ~torch.isfinite(theta0).all(dim=1)
    if bad.any():
        raise ParameterError(f"init has non-finite values in {int(bad.sum())} fitted voxel(s)")
    outside = ((theta0 < problem.lower) | (theta0 > problem.upper)).any(dim=1)
    if outside.any():
        raise BoundsError(
            f"init lies outside the parameter bounds in {int(outside.sum())} voxel(s)"
        )

    posterior = _Posterior(
        problem, likelihood=likelihood, noise_mode=noise_mode, sigma=sigma_fixed, priors=priors
    )
    V = problem.n_voxels
    bytes_per_voxel = 4 * n_keep * W * D * (2 if dtype == torch.float64 else 1) * 3
    if batch_size is None:
        batch_size = max(1, min(V, int(memory_budget // max(bytes_per_voxel, 1))))
    rng = _Random(seed, problem.device, problem.dtype)
    names = list(problem.model.parameter_names) + (["sigma"] if noise_mode == "sample" else [])
    acc_all = torch.empty(V, dtype=problem.dtype, device=problem.device)
    chunks: list[dict[str, Any]] = []
    bar = progress_bar(
        total=n_steps * math.ceil(V / batch_size), desc=f"mcmc {method}", progress=progress
    )
    with bar:
        for c0 in range(0, V, batch_size):
            idx = torch.arange(c0, min(V, c0 + batch_size), device=problem.device)
            x, scale_d = _initial_states(
                problem, posterior, theta0[idx], idx, W, D, noise_mode, rng
            )
            trace, acc = _run_chunk(
                method,
                posterior,
                x,
                idx,
                n_steps,
                n_burn,
                thin,
                n_keep,
                steps.to(scale_d) * scale_d,
                stretch,
                target_acceptance,
                rng,
                bar,
            )
            acc_all[idx] = acc
            chunks.append(_summarise(problem, trace, idx, names, qs, keep_samples))
    stats = _merge(chunks)
    res = _to_result(problem, stats, acc_all, names, qs, method, keep_samples)
    res.elapsed_s = time.perf_counter() - t0
    res.settings = {
        "method": method,
        "n_walkers": W,
        "n_steps": n_steps,
        "burnin": n_burn,
        "thin": thin,
        "noise": noise_mode,
        "likelihood": likelihood,
        "seed": seed,
        "stretch": stretch,
        "batch_size": batch_size,
        "device": str(problem.device),
        "dtype": str(dtype),
        "samples_per_voxel": n_keep * W,
    }
    log.info(
        "mcmc %s: %d voxels, %d walkers/chains, %d steps, %.2f s",
        method,
        V,
        W,
        n_steps,
        res.elapsed_s,
    )
    return res


def _noise_setup(noise: Any, problem: Problem) -> tuple[str, torch.Tensor | None]:
    if isinstance(noise, str):
        if noise != "sample":
            raise ParameterError(f"noise must be 'sample', a number or a map, got {noise!r}")
        return "sample", None
    t = torch.as_tensor(noise, dtype=problem.dtype, device=problem.device)
    if t.ndim == 0:
        t = t.expand(problem.n_voxels)
    elif tuple(t.shape) == problem.spatial_shape:
        t = t.reshape(-1)[problem.index]
    else:
        raise ShapeError(
            f"noise map has shape {tuple(t.shape)}; expected a number or the image shape "
            f"{problem.spatial_shape}"
        )
    if not (torch.isfinite(t).all() and (t > 0).all()):
        raise ParameterError("noise sigma must be positive and finite")
    return "fixed", t / problem.scale


def _step_sizes(step_size: Any, D: int) -> torch.Tensor:
    if step_size is None:
        return torch.full((D,), 2.38 / math.sqrt(D), dtype=torch.float64)
    s = torch.as_tensor(step_size, dtype=torch.float64).reshape(-1)
    if s.numel() == 1:
        s = s.expand(D)
    if s.numel() != D:
        raise ShapeError(f"step_size must be one number or {D} numbers, got {s.numel()}")
    if not (s > 0).all():
        raise ParameterError(f"step_size must be positive, got {s.tolist()}")
    return s.clone()


@torch.no_grad()
def _initial_states(
    problem: Problem,
    posterior: _Posterior,
    theta: torch.Tensor,
    idx: torch.Tensor,
    W: int,
    D: int,
    noise_mode: str,
    rng: _Random,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walkers around the start, dispersed by the Laplace posterior std; returns states and stds."""
    P = theta.shape[1]
    r, J = residual_and_jacobian(problem, theta, idx)
    n_res = r.shape[1]
    dof = max(n_res - P, 1)
    s2 = (r.double().pow(2).sum(1) / dof).clamp_min(1e-12)  # residual variance (internal units)
    if noise_mode == "fixed":
        s2 = posterior.sigma[idx].double() ** 2
    Jd = J.double()
    H = Jd.transpose(1, 2) @ Jd
    H = H + torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2) * 1e-9 + 1e-12)
    cov = torch.linalg.pinv(H) * s2[:, None, None]
    std = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0))
    width = (problem.upper - problem.lower).double()
    finite_w = torch.isfinite(width)
    cap = torch.where(finite_w, 0.1 * width, 0.1 * theta.abs().double() + 1.0)
    std = torch.minimum(std, cap.expand_as(std)).clamp_min(1e-8 * (theta.abs().double() + 1e-6))
    if noise_mode == "sample":
        log_sigma = 0.5 * torch.log(s2)
        sstd = torch.full_like(log_sigma, 1.0 / math.sqrt(2 * dof))
        center = torch.cat([theta.double(), log_sigma[:, None]], dim=1)
        std = torch.cat([std, sstd[:, None]], dim=1)
    else:
        center = theta.double()
    Vc = theta.shape[0]
    z = rng.normal(Vc, W, D).double()
    x = center[:, None, :] + 0.5 * std[:, None, :] * z
    # keep every walker inside the support (bounds) without biasing toward the centre much
    lo = problem.lower.double()
    hi = problem.upper.double()
    xt = x[..., :P]
    xt = torch.maximum(
        torch.minimum(xt, hi - 1e-6 * (hi - lo).nan_to_num(1.0)),
        lo + 1e-6 * (hi - lo).nan_to_num(1.0),
    )
    x = torch.cat([xt, x[..., P:]], dim=-1) if D > P else xt
    if D > P:
        x[..., P] = x[..., P].clamp(_LOG_SIGMA_RANGE[0] + 1e-3, _LOG_SIGMA_RANGE[1] - 1e-3)
    return x.to(problem.dtype), std.to(problem.dtype)


@torch.no_grad()
def _run_chunk(
    method: str,
    posterior: _Posterior,
    x: torch.Tensor,
    idx: torch.Tensor,
    n_steps: int,
    n_burn: int,
    thin: int,
    n_keep: int,
    step: torch.Tensor,
    stretch: float,
    target: float,
    rng: _Random,
    bar: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance all walkers of one voxel chunk; returns the trace (T, Vc, W, D) and acceptance."""
    Vc, W, D = x.shape
    flat_idx = idx[:, None].expand(Vc, W).reshape(-1)
    lp = posterior(x.reshape(-1, D), flat_idx).reshape(Vc, W)
    trace = torch.empty((n_keep, Vc, W, D), dtype=x.dtype, device=x.device)
    accepted = torch.zeros(Vc, dtype=torch.float64, device=x.device)
    proposed = 0
    window_acc = torch.zeros(Vc, dtype=torch.float64, device=x.device)
    window_n = 0
    step = step.to(x.device, x.dtype)  # (Vc, D) MH widths
    k = 0
    if method == "ensemble":
        halves = (
            torch.arange(0, W // 2, device=x.device),
            torch.arange(W // 2, W, device=x.device),
        )
        a = stretch
    for it in range(n_steps):
        if method == "ensemble":
            acc_step = torch.zeros(Vc, dtype=torch.float64, device=x.device)
            for h in (0, 1):
                S, C = halves[h], halves[1 - h]
                ns, nc = S.numel(), C.numel()
                u = rng.uniform(3, Vc, ns)
                pick = C[(u[0] * nc).long().clamp_max(nc - 1)]  # (Vc, ns) partner walkers
                xs = x[:, S]
                xc = torch.gather(x, 1, pick[..., None].expand(Vc, ns, D))
                z = ((a - 1.0) * u[1] + 1.0) ** 2 / a
                y = xc + z[..., None] * (xs - xc)
                lpy = posterior(y.reshape(-1, D), idx[:, None].expand(Vc, ns).reshape(-1)).reshape(
                    Vc, ns
                )
                log_ratio = (D - 1) * torch.log(z) + lpy - lp[:, S]
                accept = torch.log(u[2].clamp_min(1e-300)) < log_ratio
                x[:, S] = torch.where(accept[..., None], y, xs)
                lp[:, S] = torch.where(accept, lpy, lp[:, S])
                acc_step += accept.double().sum(1)
            acc_step /= W
        else:
            z = rng.normal(Vc, W, D)
            u = rng.uniform(Vc, W)
            y = x + step[:, None, :] * z
            lpy = posterior(y.reshape(-1, D), flat_idx).reshape(Vc, W)
            accept = torch.log(u.clamp_min(1e-300)) < lpy - lp
            x = torch.where(accept[..., None], y, x)
            lp = torch.where(accept, lpy, lp)
            acc_step = accept.double().mean(1)
            if it < n_burn:  # adapt widths toward the target acceptance, then freeze them
                window_acc += acc_step
                window_n += 1
                if window_n == 25:
                    rate = window_acc / window_n
                    factor = torch.exp(((rate - target) / target).clamp(-1.0, 1.0)).to(x.dtype)
                    step = step * factor[:, None]
                    window_acc.zero_()
                    window_n = 0
        if it >= n_burn:
            accepted += acc_step
            proposed += 1
            if (it - n_burn) % thin == 0 and k < n_keep:
                trace[k] = x
                k += 1
        bar.update(1)
    return trace[:k], (accepted / max(proposed, 1)).to(x.dtype)


def _autocorr_time(trace: torch.Tensor, c: float = 5.0, max_bytes: int = 256 << 20) -> torch.Tensor:
    """Integrated autocorrelation time per (voxel, parameter) from ``trace (T, Vc, W, D)``.

    The normalised autocorrelation function of each walker's chain (by FFT) is averaged over
    walkers, summed into τ(M) = 1 + 2·Σ_{t≤M} ρ(t), and cut at Sokal's automatic window, the
    smallest M with M ≥ c·τ(M) — the estimator Goodman & Weare and emcee use. Voxels are processed
    in groups so the FFT buffers stay within ``max_bytes``.
    """
    T, Vc, W, D = trace.shape
    n = 1 << (2 * T - 1).bit_length()
    per_voxel = W * D * (n + 2) * 8 * 3
    group = max(1, int(max_bytes // per_voxel))
    out = []
    m = torch.arange(T, device=trace.device, dtype=torch.float32)[:, None, None]
    for g0 in range(0, Vc, group):
        x = trace[:, g0 : g0 + group].float()
        x = x - x.mean(0, keepdim=True)
        f = torch.fft.rfft(x, n=n, dim=0)
        acf = torch.fft.irfft(f * f.conj(), n=n, dim=0)[:T]
        del f
        acf = acf / acf[:1].clamp_min(1e-30)
        rho = acf.mean(2)  # average over walkers: (T, g, D)
        taus = 2.0 * torch.cumsum(rho, 0) - 1.0
        ok = m >= c * taus
        first = torch.where(ok.any(0), ok.float().argmax(0), torch.full_like(taus[0], T - 1)).long()
        out.append(taus.gather(0, first[None])[0].clamp_min(1.0))
    return torch.cat(out, dim=0).to(trace.dtype)


def _rhat(trace: torch.Tensor) -> torch.Tensor:
    """Gelman–Rubin R̂ with each walker/chain as a chain: ``trace (T, Vc, W, D)`` -> (Vc, D)."""
    T = trace.shape[0]
    x = trace.double()
    means = x.mean(0)  # (Vc, W, D)
    vars_ = x.var(0, unbiased=True)
    within = vars_.mean(1)
    between = T * means.var(1, unbiased=True) if x.shape[2] > 1 else torch.zeros_like(within)
    var_plus = (T - 1) / T * within + between / T
    return torch.sqrt(var_plus / within.clamp_min(1e-300))


def _quantiles(sorted_vals: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile of ``sorted_vals (..., N)`` along the last axis."""
    n = sorted_vals.shape[-1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    w = pos - lo
    return sorted_vals[..., lo] * (1 - w) + sorted_vals[..., hi] * w


def _summarise(
    problem: Problem,
    trace: torch.Tensor,
    idx: torch.Tensor,
    names: list[str],
    qs: tuple[float, ...],
    keep: bool,
) -> dict[str, Any]:
    T, Vc, W, D = trace.shape
    P = problem.model.n_params
    # τ from at most MAX_TAU_STEPS evenly spaced steps: with thinning k, τ ≈ k·τ_thinned, which
    # overestimates τ (so underestimates the ESS) only when τ < k — a conservative shortcut
    k = max(1, -(-T // MAX_TAU_STEPS))
    tau = _autocorr_time(trace[::k]) * k  # (Vc, D), in stored steps
    rhat = _rhat(trace)
    samples = trace.permute(1, 0, 2, 3).reshape(Vc, T * W, D)
    # physical values of every sample: amplitudes and sigma times the data scale
    phys: dict[str, torch.Tensor] = {}
    for j, name in enumerate(names):
        v = samples[..., j]
        if j < P and problem.model.parameters[j].amplitude:
            v = v * problem.scale
        elif j == P:  # sigma, sampled as log sigma
            v = torch.exp(v) * problem.scale
        phys[name] = v
    cols = {k: phys[k].reshape(-1, 1) for k in problem.model.parameter_names}
    cols.update({k: v[idx].repeat_interleave(T * W, 0) for k, v in problem.inputs.items()})
    for k, v in problem.model.derived(cols).items():
        phys[k] = v.reshape(Vc, T * W).to(samples.dtype)
    out: dict[str, Any] = {
        "idx": idx,
        "mean": {},
        "std": {},
        "median": {},
        "q": {q: {} for q in qs},
        "tau": {},
        "ess": {},
        "rhat": {},
        "samples": {} if keep else None,
    }
    for k, v in phys.items():
        out["mean"][k] = v.mean(1)
        out["std"][k] = v.std(1, unbiased=True)
        # quantiles from at most MAX_QUANTILE_SAMPLES evenly spaced samples: their Monte Carlo
        # error is set by the effective sample size, which is far smaller
        stride = max(1, -(-v.shape[1] // MAX_QUANTILE_SAMPLES))
        s, _ = torch.sort(v[:, ::stride], dim=1)
        out["median"][k] = _quantiles(s, 0.5)
        for q in qs:
            out["q"][q][k] = _quantiles(s, q)
        if keep:
            out["samples"][k] = v
    for j, k in enumerate(names):
        out["tau"][k] = tau[:, j].to(samples.dtype)
        out["ess"][k] = (T * W / tau[:, j]).to(samples.dtype)
        out["rhat"][k] = rhat[:, j].to(samples.dtype)
    return out


def _merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    if len(chunks) == 1:
        return chunks[0]
    out: dict[str, Any] = {"idx": torch.cat([c["idx"] for c in chunks])}
    for key in ("mean", "std", "median", "tau", "ess", "rhat"):
        out[key] = {k: torch.cat([c[key][k] for c in chunks]) for k in chunks[0][key]}
    out["q"] = {
        q: {k: torch.cat([c["q"][q][k] for c in chunks]) for k in chunks[0]["q"][q]}
        for q in chunks[0]["q"]
    }
    out["samples"] = (
        None
        if chunks[0]["samples"] is None
        else {k: torch.cat([c["samples"][k] for c in chunks]) for k in chunks[0]["samples"]}
    )
    return out


def _to_result(
    problem: Problem,
    stats: dict[str, Any],
    acc: torch.Tensor,
    names: list[str],
    qs: tuple[float, ...],
    method: str,
    keep: bool,
) -> McmcResult:
    def maps(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: problem.to_map(v) for k, v in d.items()}

    units = {p.name: p.unit for p in problem.model.parameters}
    units.update(getattr(problem.model, "derived_units", {}) or {})
    units["sigma"] = "a.u."
    return McmcResult(
        mean=maps(stats["mean"]),
        std=maps(stats["std"]),
        median=maps(stats["median"]),
        quantiles={q: maps(stats["q"][q]) for q in qs},
        acceptance=problem.to_map(acc),
        tau=maps(stats["tau"]),
        ess=maps(stats["ess"]),
        rhat=maps(stats["rhat"]),
        mask=problem.to_map(torch.ones(problem.n_voxels, dtype=torch.bool, device=acc.device)),
        elapsed_s=0.0,
        method=method,
        model_name=problem.model.name,
        units=units,
        map_names={**problem.model.map_names, "sigma": "sigma"},
        samples=maps(stats["samples"]) if keep and stats["samples"] is not None else None,
        n_excluded=problem.n_nonfinite,
    )


__all__ = ["mcmc", "McmcResult"]
