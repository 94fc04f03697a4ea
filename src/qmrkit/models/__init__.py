"""Signal models (each a :class:`qmrkit.fit.Model`): relaxometry, diffusion (DTI, ...) and myelin water
(three-pool GRE, MCR-MWI)."""

from .diffusion import DKI, DTI
from .myelin import McrMwi, ThreePoolGRE, train_mcr_mwi_surrogate
from .registry import available, get
from .relaxometry import (
    InversionRecovery,
    MolliT1,
    MonoExp,
    VfaT1,
    polish_on_shape,
    recovery_start,
)

__all__ = [
    "DTI",
    "DKI",
    "MolliT1",
    "InversionRecovery",
    "VfaT1",
    "MonoExp",
    "polish_on_shape",
    "recovery_start",
    "ThreePoolGRE",
    "McrMwi",
    "train_mcr_mwi_surrogate",
    "get",
    "available",
]
