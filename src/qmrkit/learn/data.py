"""Datasets for learned reconstruction: user arrays and a synthetic multi-coil generator.

A sample is a dict of tensors: ``y`` (k-space, ``(coils, *im)``), ``maps`` (coil sensitivities,
``(coils, *im)``), ``mask`` (Cartesian sampling mask broadcasting to ``im``) and ``target`` (the
reference image, ``im``). :func:`sample_operator` builds the Cartesian SENSE operator
``Mask·FFT·Sense`` of a sample.

The synthetic generator is small and self-contained (smooth Gaussian coil profiles and
variable-density Cartesian masks written here); it can switch to the ``qmrkit.sim`` coil and mask
helpers once those exist. Images come from :func:`qmrkit.sim.cardiac_phantom` and
:func:`qmrkit.sim.nist_phantom` tissue maps with random contrast, position, orientation and a smooth
background phase.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import ops
from ..errors import DataFileError, ParameterError, ShapeError
from ..sim.phantoms import cardiac_phantom, nist_phantom

KINDS = ("2d", "3d", "2d+t")


def coil_maps(shape: Sequence[int], n_coils: int, seed: int = 0, width: float = 0.6) -> np.ndarray:
    """Smooth coil sensitivities ``(n_coils, *shape)``, complex64, normalised to ``Σ|S|² = 1``.

    Coils sit on a ring around the field of view (in the last two axes); each profile is a
    Gaussian of relative ``width`` times a linear phase, so ``‖Sense‖ = 1``.
    """
    if n_coils < 1:
        raise ParameterError(f"coil_maps: n_coils must be >= 1, got {n_coils}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    yy, xx = grids[-2], grids[-1]
    zz = grids[0] if len(shape) == 3 else 0.0
    maps = np.empty((n_coils, *shape), np.complex128)
    phi0 = rng.uniform(0, 2 * np.pi)
    for c in range(n_coils):
        a = phi0 + 2 * np.pi * c / n_coils
        cy, cx = 1.3 * np.sin(a), 1.3 * np.cos(a)
        mag = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        if len(shape) == 3:
            mag = mag * (1 + 0.2 * np.cos(np.pi * zz + a))
        ph = rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx + rng.uniform(0, 2 * np.pi)
        maps[c] = mag * np.exp(1j * ph)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    return maps.astype(np.complex64)


def cartesian_mask(
    shape: Sequence[int], acceleration: float, center_fraction: float = 0.08, seed: int = 0
) -> np.ndarray:
    """Variable-density random Cartesian mask, fully sampled along the readout (last) axis.

    For 2D images ``(ny, nx)`` it samples phase-encoding lines (mask ``(ny, 1)``); for 3D
    ``(nz, ny, nx)`` points of the ``(nz, ny)`` plane (mask ``(nz, ny, 1)``); for 2D+time
    ``(nt, ny, nx)`` use :func:`dynamic_mask`. A central band of ``center_fraction`` of the lines
    is always sampled; the rest is drawn with a density decaying away from the centre, with
    about ``n/acceleration`` samples in total.
    """
    if acceleration < 1:
        raise ParameterError(f"cartesian_mask: acceleration must be >= 1, got {acceleration}")
    rng = np.random.default_rng(seed)
    pe = tuple(int(s) for s in shape[:-1])
    n = int(np.prod(pe))
    coords = np.meshgrid(*[np.linspace(-1, 1, s) for s in pe], indexing="ij")
    r = np.sqrt(sum(c**2 for c in coords))
    centre = r <= center_fraction * (1 if len(pe) == 1 else 2)
    target = max(int(round(n / acceleration)), int(centre.sum()))
    w = (1 - r / (r.max() + 1e-9)) ** 2 + 0.05
    w[centre] = 0
    k = target - int(centre.sum())
    idx = rng.choice(n, size=min(k, int((w > 0).sum())), replace=False, p=(w / w.sum()).ravel())
    m = centre.ravel().copy()
    m[idx] = True
    return m.reshape(*pe, 1)


def dynamic_mask(
    shape: Sequence[int], acceleration: float, center_fraction: float = 0.08, seed: int = 0
) -> np.ndarray:
    """2D+time mask ``(nt, ny, 1)``: a different random line pattern per frame."""
    nt = int(shape[0])
    return np.stack(
        [
            cartesian_mask(shape[1:], acceleration, center_fraction, seed=seed + 7919 * t)
            for t in range(nt)
        ]
    )


def _contrast_image(maps: dict, rng: np.random.Generator) -> np.ndarray:
    tr = rng.uniform(300, 3000)  # ms
    te = rng.uniform(5, 80)  # ms
    t1 = np.maximum(maps["T1"], 1e-3)
    t2 = np.maximum(maps["T2"], 1e-3)
    return maps["PD"] * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)


def _phantom(shape2d: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    big = tuple(int(s * 1.25) for s in shape2d)
    if rng.random() < 0.75:
        ph = cardiac_phantom(big)
    else:
        ph = nist_phantom(big, plate=str(rng.choice(["T1", "T2"])))
    img = _contrast_image(ph, rng)
    img = np.rot90(img, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    oy = int(rng.integers(0, big[0] - shape2d[0] + 1))
    ox = int(rng.integers(0, big[1] - shape2d[1] + 1))
    return np.ascontiguousarray(img[oy : oy + shape2d[0], ox : ox + shape2d[1]])


def synthetic_image(shape: Sequence[int], kind: str = "2d", seed: int = 0) -> np.ndarray:
    """One complex test image of ``shape`` (normalised to max magnitude 1), complex64.

    ``kind="2d"``: ``(ny, nx)``; ``"3d"``: ``(nz, ny, nx)`` slab whose slices vary smoothly;
    ``"2d+t"``: ``(nt, ny, nx)`` series with a moving, pulsing structure.
    """
    if kind not in KINDS:
        raise ParameterError(f"synthetic_image: kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    if kind == "2d":
        if len(shape) != 2:
            raise ShapeError(f"synthetic_image: kind '2d' needs a 2D shape, got {shape}")
        mag = _phantom(shape, rng)
    else:
        if len(shape) != 3:
            raise ShapeError(f"synthetic_image: kind {kind!r} needs a 3D shape, got {shape}")
        base = _phantom(shape[1:], rng)
        frames = []
        for t in range(shape[0]):
            f = t / max(shape[0] - 1, 1)
            if kind == "3d":
                frames.append(base * (0.8 + 0.2 * np.cos(np.pi * (f - 0.5))))
            else:
                shift = int(round(2 * np.sin(2 * np.pi * f)))
                frames.append(np.roll(base, shift, axis=0) * (0.9 + 0.1 * np.sin(2 * np.pi * f)))
        mag = np.stack(frames)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in mag.shape], indexing="ij")
    phase = sum(rng.uniform(-1, 1) * g for g in grids) + rng.uniform(0, 2 * np.pi)
    img = mag * np.exp(1j * phase)
    m = np.abs(img).max()
    return (img / (m if m > 0 else 1)).astype(np.complex64)


def sample_operator(sample: dict) -> ops.LinearOperator:
    """Cartesian SENSE operator ``Mask·FFT·Sense`` of a sample (maps ``(coils, *im)``)."""
    maps = sample["maps"]
    full = tuple(maps.shape)
    nd = maps.ndim - 1
    return (
        ops.Mask(sample["mask"], shape=full)
        @ ops.FFT(full, axes=tuple(range(-nd, 0)))
        @ ops.Sense(maps)
    )


def _as_tensor(a, dtype=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype) if dtype is not None else t


class ArrayDataset(torch.utils.data.Dataset):
    """Samples from arrays (NumPy or torch).

    Parameters
    ----------
    kspace : array ``(n, coils, *im)``, complex
        Undersampled k-space (zeros where not sampled), centred FFT convention of
        :class:`qmrkit.ops.FFT` with ``norm="ortho"``.
    maps : array ``(n, coils, *im)`` or ``(coils, *im)``
        Coil sensitivities (shared when given without ``n``).
    masks : array ``(n, *m)`` or ``(*m,)``
        Sampling masks broadcasting to ``im``.
    targets : array ``(n, *im)``
        Reference images.
    """

    def __init__(self, kspace, maps, masks, targets):
        self.y = _as_tensor(kspace, torch.complex64)
        self.target = _as_tensor(targets, torch.complex64)
        maps = _as_tensor(maps, torch.complex64)
        masks = _as_tensor(masks).to(torch.bool)
        n = self.y.shape[0]
        if self.y.ndim < 4:
            raise ShapeError(
                f"ArrayDataset: kspace must be (n, coils, *im) with a 2D/3D im, got {tuple(self.y.shape)}"
            )
        im = tuple(self.y.shape[2:])
        if tuple(self.target.shape) != (n, *im):
            raise ShapeError(
                f"ArrayDataset: targets must have shape {(n, *im)}, got {tuple(self.target.shape)}"
            )
        self.maps = maps if maps.ndim == self.y.ndim else maps.expand(n, *maps.shape)
        if tuple(self.maps.shape) != tuple(self.y.shape):
            raise ShapeError(
                f"ArrayDataset: maps must have shape {tuple(self.y.shape)} (or without n), got {tuple(maps.shape)}"
            )
        self.masks = masks if masks.ndim == len(im) + 1 else masks.expand(n, *masks.shape)
        if self.masks.shape[0] != n or self.masks.ndim != len(im) + 1:
            raise ShapeError(
                f"ArrayDataset: masks must broadcast to {(n, *im)}, got {tuple(masks.shape)}"
            )

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {
            "y": self.y[i],
            "maps": self.maps[i],
            "mask": self.masks[i],
            "target": self.target[i],
        }

    @classmethod
    def from_npz(cls, path) -> ArrayDataset:
        """Load ``kspace``, ``maps``, ``masks``, ``targets`` arrays from a ``.npz`` file."""
        from ..errors import DataFileError

        try:
            with np.load(path) as f:
                return cls(f["kspace"], f["maps"], f["masks"], f["targets"])
        except (OSError, KeyError, ValueError) as exc:
            raise DataFileError(
                f"cannot read a learn dataset from {path}: {exc}; expected an .npz file with "
                "arrays kspace, maps, masks, targets"
            ) from exc


class SyntheticDataset(torch.utils.data.Dataset):
    """Synthetic multi-coil Cartesian samples (generated once, reproducible from ``seed``).

    Parameters
    ----------
    n : int
        Number of samples.
    shape : tuple
        Image shape: ``(ny, nx)`` for ``kind="2d"``, ``(nz, ny, nx)`` for ``"3d"``,
        ``(nt, ny, nx)`` for ``"2d+t"``.
    n_coils : int
    acceleration : float
        Undersampling factor of the Cartesian masks (a new mask per sample).
    noise : float
        Complex Gaussian noise standard deviation relative to the RMS of the sampled k-space.
    kind : {"2d", "3d", "2d+t"}
    seed : int
    """

    def __init__(
        self,
        n: int,
        shape=(32, 32),
        n_coils: int = 4,
        acceleration: float = 4.0,
        noise: float = 0.01,
        kind: str = "2d",
        seed: int = 0,
        center_fraction: float = 0.08,
    ):
        if n < 1:
            raise ParameterError(f"SyntheticDataset: n must be >= 1, got {n}")
        self.config = dict(
            n=n,
            shape=tuple(shape),
            n_coils=n_coils,
            acceleration=acceleration,
            noise=noise,
            kind=kind,
            seed=seed,
            center_fraction=center_fraction,
        )
        self.samples = []
        for i in range(n):
            s = seed * 100003 + i
            img = torch.from_numpy(synthetic_image(shape, kind, seed=s))
            maps = torch.from_numpy(coil_maps(shape, n_coils, seed=s))
            mfun = dynamic_mask if kind == "2d+t" else cartesian_mask
            mask = torch.from_numpy(mfun(shape, acceleration, center_fraction, seed=s))
            sample = {"maps": maps, "mask": mask, "target": img}
            A = sample_operator(sample)
            y = A(img)
            if noise > 0:
                g = torch.Generator().manual_seed(s)
                sampled = mask.expand(shape).sum()
                rms = float(y.abs().pow(2).sum() / (sampled * n_coils)) ** 0.5
                nz = torch.randn(y.shape, generator=g, dtype=torch.complex64) * (noise * rms)
                y = y + ops.Mask(mask, shape=tuple(y.shape))(nz)
            sample["y"] = y
            self.samples.append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


class MrdDataset(torch.utils.data.Dataset):
    """Training samples from fully sampled Cartesian ISMRMRD/MRD files, undersampled retrospectively.

    Each file is read with :func:`qmrkit.io.mrd.read_mrd`; every entry of its batch axes
    (slices, repetitions, ...) becomes one sample on the encoded matrix (2D ``(ny, nx)`` or 3D
    ``(nz, ny, nx)``; readout oversampling is kept). For a sample with k-space ``k`` (coils,
    *matrix):

    * coil images ``I_c = FFTᴴ k_c`` (centred, orthonormal: the :class:`qmrkit.ops.FFT`
      convention, which :func:`qmrkit.io.mrd.write_mrd` and :mod:`qmrkit.sim` use);
    * target ``x = √Σ|I_c|²`` (root sum of squares, real) and maps ``S_c = I_c / x`` where
      ``x > background·max x``, zero elsewhere — so ``S·x`` reproduces the coil images and the
      retrospectively undersampled data are exactly consistent with ``A = Mask·FFT·Sense``;
    * a variable-density mask from :func:`cartesian_mask` (a new pattern per sample, seeded);
    * ``y = A x`` — the acquired k-space on the mask, without the image content below the
      background threshold (noise outside the object) — everything divided by ``max x``
      (targets peak at 1).

    Parameters
    ----------
    paths : path or sequence of paths
        MRD/ISMRMRD HDF5 files with fully sampled Cartesian data.
    acceleration, center_fraction : float
        Undersampling of :func:`cartesian_mask`.
    seed : int
        Seed of the masks.
    background : float
        Relative threshold below which maps are set to zero.
    dataset : str
        HDF5 group of the data in each file.

    Raises
    ------
    DataFileError
        A file cannot be read, is non-Cartesian, or is not fully sampled (a target needs every
        k-space line).
    """

    def __init__(
        self,
        paths,
        acceleration: float = 4.0,
        center_fraction: float = 0.08,
        seed: int = 0,
        background: float = 0.05,
        dataset: str = "dataset",
    ):
        from ..io.mrd import read_mrd

        if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
            paths = [paths]
        self.samples: list[dict] = []
        for path in paths:
            scan = read_mrd(path, dataset=dataset)
            if not scan.is_cartesian:
                raise DataFileError(
                    f"MrdDataset: {path} holds {scan.trajectory} data; only Cartesian files are "
                    "supported (a non-Cartesian target needs a reference reconstruction)"
                )
            nd = scan.ndim
            if scan.mask is not None and not bool(scan.mask.all()):
                frac = float(scan.mask.float().mean())
                raise DataFileError(
                    f"MrdDataset: {path} is not fully sampled ({frac:.0%} of the k-space matrix "
                    "acquired); training targets need fully sampled data"
                )
            k_all = scan.kdata.to(torch.complex64)
            k_all = k_all.reshape(-1, *k_all.shape[k_all.ndim - nd - 1 :])
            for kk in k_all:
                i = len(self.samples)
                full = tuple(kk.shape)
                fft = ops.FFT(full, axes=tuple(range(-nd, 0)))
                coil_images = fft.H(kk)
                rss = coil_images.abs().pow(2).sum(0).sqrt()
                peak = float(rss.max())
                if not peak > 0:
                    raise DataFileError(f"MrdDataset: entry {i} of {path} is all zeros")
                fg = rss > background * peak
                maps = torch.where(fg, coil_images / torch.where(fg, rss, 1.0), 0)
                target = torch.where(fg, rss, 0).to(torch.complex64)
                mask = torch.from_numpy(
                    cartesian_mask(full[1:], acceleration, center_fraction, seed=seed * 100003 + i)
                )
                sample = {"maps": maps, "mask": mask, "target": target / peak}
                sample["y"] = sample_operator(sample)(sample["target"])
                self.samples.append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


__all__ = [
    "ArrayDataset",
    "SyntheticDataset",
    "MrdDataset",
    "coil_maps",
    "cartesian_mask",
    "dynamic_mask",
    "synthetic_image",
    "sample_operator",
]
