"""The automatic object mask: which voxels of an image series hold the object (the rest is air).

One function, :func:`object_mask`, used by every face that fits maps: ``qmrkit fit`` (relaxometry
and diffusion, ``--mask auto``, the default), ``qmrkit mrf`` and the server's ``fit:<model>`` and
``mrf`` pipelines (through :func:`fit_maps`, :func:`diffusion_maps` and :func:`mrf_maps`), so the
same data get the same mask everywhere.

The rule (and why)
------------------
1. **Summary image**: the root-sum-of-squares over the measurement axis, ``s = sqrt(Σ_n |x_n|²)``
   (magnitude for complex data). Every measurement contributes, so a tissue at its null in one
   image (a MOLLI TI near ``T1*·ln 2``, a high b-value) is still bright in ``s``; background noise
   stays at the noise floor (``≈ σ·sqrt(2·n)`` for Rician magnitude noise).
2. **Threshold**: Otsu's threshold on the histogram of ``s`` (256 bins from its minimum to its
   99.9th percentile, brighter voxels in the last bin): the level that maximises the
   between-class variance of "below" and "above". Air and object form two well separated
   modes in MR magnitude images, which is the case Otsu's method is exact for, and it needs no
   noise estimate or tuning constant. Where a range of levels ties (an empty gap between the
   modes, as in noiseless or high-SNR data) the middle of that range is taken, the level farthest
   from both modes.
3. **No-background guard**: Otsu always splits, even an image that is all object (a tight field
   of view), where it would cut between tissues. The split is therefore accepted only when it
   looks like "noise floor vs object": the lower class's mean is at most ``background_ratio``
   (0.5) times the upper class's, *and* the split explains at least ``min_separability`` (0.8)
   of the variance of ``s`` (Otsu's separability η = between-class / total variance; 1 for two
   spikes, 0.75 for a uniform distribution, 0.64 for a Gaussian). Measured on the cardiac
   phantom's MOLLI series: SNR 50 gives (ratio, η) = (0.06, 0.94), SNR 7 (0.38, 0.85) — both
   accepted —, SNR 5 (0.51, 0.79), the phantom's tissues alone (0.80, 0.82), uniformly random
   amplitudes (0.33, 0.75) — all refused. Without an accepted split every finite voxel is kept
   and the report says so (``BackgroundFound: false``).
4. **Small holes** in the object (enclosed regions below the threshold: a dark vessel, a noisy
   voxel at a tissue boundary) are filled when they hold at most ``max_hole`` (1 %) of the
   image's voxels; larger enclosed regions (e.g. lungs in a torso) stay outside, as they are
   below the noise-floor threshold for a reason. Connectivity is 8 (2D) / 26 (3D) neighbours, so
   a diagonal gap in the object's outline connects a region to the outside (it is then not a
   hole): filling is conservative.

Voxels outside the mask come out NaN in every map (``FitResult.maps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ParameterError, ShapeError

#: the ``--mask`` words (anything else is a mask file)
AUTO, NONE = "auto", "none"


@dataclass(frozen=True)
class ObjectMask:
    """The result of :func:`object_mask`.

    Attributes
    ----------
    mask : Tensor bool (*spatial)
        True where the object is; on the data's device.
    threshold : float or None
        Otsu threshold on the root-sum-of-squares image, in data units; None when no background
        was found (every finite voxel is kept).
    n_voxels : int
        Voxels in the mask.
    n_filled : int
        Voxels added by the small-hole fill.
    background_ratio : float
        Mean of the lower class over the mean of the upper class of the Otsu split (NaN for
        constant data).
    separability : float
        Otsu's η of the split: between-class over total variance of the summary image (NaN for
        constant data).
    """

    mask: torch.Tensor
    threshold: float | None
    n_voxels: int
    n_filled: int
    background_ratio: float
    separability: float

    def sidecar(self) -> dict[str, Any]:
        """What ``fit.json`` and the map sidecars record under ``"Mask"``."""
        return {
            "Method": "auto",
            "Rule": "Otsu threshold on the root-sum-of-squares over measurements, accepted when "
            "the lower/upper class mean ratio <= 0.5 and the separability >= 0.8 (else every "
            "voxel is kept); enclosed holes of <= 1% of the voxels filled",
            "ClassMeanRatio": _finite_or_none(self.background_ratio),
            "Separability": _finite_or_none(self.separability),
            "Threshold": self.threshold,
            "BackgroundFound": self.threshold is not None,
            "VoxelCount": self.n_voxels,
            "VoxelsFilled": self.n_filled,
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _otsu(values: torch.Tensor, bins: int = 256) -> tuple[float, float, float, float] | None:
    """Otsu's threshold of 1D finite ``values``, the means of the two classes and the split's
    separability η; None when the values are (nearly) constant."""
    v = values.double()
    lo = float(v.min())
    step = max(1, v.numel() // 200_000)  # quantile of a subsample: exact enough for a range
    hi = float(torch.quantile(v[::step], 0.999))
    if not hi > lo:
        hi = float(v.max())
        if not hi > lo:
            return None
    hist = torch.histc(v.clamp(max=hi), bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    centres = lo + (torch.arange(bins, dtype=torch.float64, device=v.device) + 0.5) * width
    p = hist / hist.sum()
    w0 = p.cumsum(0)[:-1]  # split after bin k: classes [0..k] and [k+1..]
    m0 = (p * centres).cumsum(0)[:-1]
    mt = float((p * centres).sum())
    w1 = 1 - w0
    between = torch.where(
        (w0 > 0) & (w1 > 0), (mt * w0 - m0) ** 2 / (w0 * w1).clamp_min(1e-300), 0.0
    )
    best = float(between.max())
    if not best > 0:
        return None
    ties = torch.nonzero(between >= best * (1 - 1e-9)).flatten()
    # middle of the tied range: with an empty gap between the modes every split in the gap ties
    k_lo, k_hi = int(ties[0]), int(ties[-1])
    threshold = lo + (0.5 * (k_lo + k_hi) + 1) * width
    below = v <= threshold
    if bool(below.all()) or not bool(below.any()):
        return None
    mean_lo, mean_hi = float(v[below].mean()), float(v[~below].mean())
    w0 = float(below.double().mean())
    total = float(v.var(unbiased=False))
    eta = w0 * (1 - w0) * (mean_hi - mean_lo) ** 2 / total if total > 0 else float("nan")
    return threshold, mean_lo, mean_hi, eta


def _fill_small_holes(mask: torch.Tensor, max_voxels: int) -> torch.Tensor:
    """``mask`` with enclosed background regions of at most ``max_voxels`` voxels set True.

    Background regions are labelled by propagating the largest voxel index through 8/26-connected
    background neighbours (max-pooling) until nothing changes: each region ends up carrying one
    label. Regions touching the image border are outside, not holes.
    """
    nd = mask.ndim
    if max_voxels < 1 or nd not in (1, 2, 3) or bool(mask.all()) or not bool(mask.any()):
        return mask
    pool = {
        1: torch.nn.functional.max_pool1d,
        2: torch.nn.functional.max_pool2d,
        3: torch.nn.functional.max_pool3d,
    }[nd]
    bg = ~mask
    # labels are voxel indices, exact in float32 up to 2**24 (≈ 16.7M voxels), float64 beyond
    dtype = torch.float32 if mask.numel() < 2**24 else torch.float64
    idx = torch.arange(1, mask.numel() + 1, dtype=dtype, device=mask.device)
    lab = torch.where(bg, idx.reshape(mask.shape), 0.0)
    while True:
        grown = pool(lab[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
        grown = torch.where(bg, grown, 0.0)
        if torch.equal(grown, lab):
            break
        # pointer jumping: a label is the index of a voxel of the same region, whose own label
        # may have grown further; taking it moves labels across a region in ~log(size) rounds
        # instead of one voxel per round
        for _ in range(4):
            jumped = grown.reshape(-1)[(grown.reshape(-1).long() - 1).clamp_min(0)]
            grown = torch.where(bg, torch.maximum(grown, jumped.reshape(mask.shape)), 0.0)
        lab = grown
    border = torch.zeros_like(mask)
    for axis in range(nd):
        border.select(axis, 0).fill_(True)
        border.select(axis, mask.shape[axis] - 1).fill_(True)
    outside = torch.unique(lab[border & bg])
    labels, counts = torch.unique(lab[bg], return_counts=True)
    small = labels[(counts <= max_voxels) & ~torch.isin(labels, outside)]
    if small.numel() == 0:
        return mask
    return mask | (bg & torch.isin(lab, small))


def object_mask(
    data: Any,
    *,
    background_ratio: float = 0.5,
    min_separability: float = 0.8,
    max_hole: float = 0.01,
) -> ObjectMask:
    """The automatic object mask of an image series (the rule is in the module docstring).

    Parameters
    ----------
    data : array or Tensor (*spatial, n_meas)
        Image series, measurement axis last (NIfTI order), real or complex; any units.
    background_ratio : float
        Largest lower-class/upper-class mean ratio accepted as "background vs object" (see the
        module docstring).
    min_separability : float
        Smallest Otsu separability η accepted as "background vs object".
    max_hole : float
        Largest enclosed region filled, as a fraction of the image's voxels (0 disables filling).

    Returns
    -------
    ObjectMask
        The mask (on the data's device) with the threshold and voxel counts for the sidecar.

    Raises
    ------
    ShapeError
        If ``data`` has fewer than 2 axes (no image axis and measurement axis).
    ParameterError
        If ``background_ratio`` or ``min_separability`` is not in (0, 1) or ``max_hole`` not in
        [0, 1).
    """
    if not 0 < background_ratio < 1:
        raise ParameterError(f"background_ratio must be in (0, 1), got {background_ratio}")
    if not 0 < min_separability < 1:
        raise ParameterError(f"min_separability must be in (0, 1), got {min_separability}")
    if not 0 <= max_hole < 1:
        raise ParameterError(f"max_hole must be in [0, 1), got {max_hole}")
    x = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
    if x.ndim < 2:
        raise ShapeError(
            f"object_mask needs an image series (*spatial, n_meas), got shape {tuple(x.shape)}"
        )
    with torch.no_grad():
        s = torch.linalg.vector_norm(x.abs().double() if x.is_complex() else x.double(), dim=-1)
        finite = torch.isfinite(s)
        split = _otsu(s[finite]) if bool(finite.any()) else None
        ratio = float("nan") if split is None else split[1] / split[2]
        eta = float("nan") if split is None else split[3]
        if split is None or not (ratio <= background_ratio and eta >= min_separability):
            return ObjectMask(finite, None, int(finite.sum()), 0, ratio, eta)
        threshold = split[0]
        above = finite & (s > threshold)
        filled = _fill_small_holes(above, int(max_hole * above.numel()))
        filled = filled & finite  # a NaN voxel inside the object stays out (fits exclude it)
        n = int(filled.sum())
        return ObjectMask(filled, threshold, n, n - int(above.sum()), ratio, eta)


def resolve_mask(mask: Any, data: Any) -> tuple[Any, ObjectMask | None]:
    """A pipeline's ``mask`` option: ``"auto"`` → :func:`object_mask` of ``data``; ``"none"`` or
    None → every voxel; an array/Tensor → itself (non-zero voxels). Returns the mask to fit with
    (None: all voxels) and the :class:`ObjectMask` when one was computed."""
    if isinstance(mask, str):
        word = mask.strip().lower()
        if word == AUTO:
            auto = object_mask(data)
            return auto.mask, auto
        if word == NONE:
            return None, None
        raise ParameterError(f"mask must be 'auto', 'none', None or an array, got {mask!r}")
    return mask, None
