"""Learned reconstruction: unrolled networks with memory-efficient training (MEL).

* :class:`UnrolledNet` — MoDL-style unrolled network (CG or gradient-step data consistency with a
  learnable weight) for any :mod:`qmrkit.ops` forward operator, with four memory modes:
  ``standard``, ``checkpoint``, ``reversible`` (MEL) and ``hybrid``.
* :class:`ResidualCNN` — residual CNN denoisers for 2D, 3D and 2D+time complex images, optionally
  spectrally normalised (invertible by fixed-point iteration).
* :class:`CouplingCNN` — checkerboard coupling denoiser, inverted exactly in one evaluation
  (the cheapest ``reversible``/``hybrid`` backward; a weaker denoiser than ResidualCNN).
* :func:`train`, :func:`evaluate` — training loop (Adam; L1/L2/SSIM losses; PSNR/SSIM/NRMSE
  validation; checkpoints and resume) and evaluation.
* :mod:`qmrkit.learn.data` — datasets from arrays, fully sampled ISMRMRD files
  (:class:`MrdDataset`) and a synthetic multi-coil generator.

Importing this package imports torch only (already needed by qmrkit).
"""

from .data import ArrayDataset, MrdDataset, SyntheticDataset, sample_operator
from .dc import CGDataConsistency, GradientDataConsistency
from .denoisers import CouplingCNN, ResidualCNN
from .operators import CoilBatched, noncartesian_sense
from .train import (
    NonFiniteLossError,
    TrainResult,
    baselines,
    build_model,
    evaluate,
    load_model,
    model_config,
    train,
)
from .unrolled import MEMORY_MODES, InversionWarning, UnrolledNet

__all__ = [
    "UnrolledNet",
    "ResidualCNN",
    "CouplingCNN",
    "CGDataConsistency",
    "GradientDataConsistency",
    "InversionWarning",
    "MEMORY_MODES",
    "ArrayDataset",
    "SyntheticDataset",
    "MrdDataset",
    "sample_operator",
    "train",
    "evaluate",
    "baselines",
    "TrainResult",
    "NonFiniteLossError",
    "model_config",
    "build_model",
    "load_model",
    "CoilBatched",
    "noncartesian_sense",
]
