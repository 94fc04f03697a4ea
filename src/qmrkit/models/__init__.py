"""Signal models (each a :class:`qmrkit.fit.Model`): relaxometry and diffusion (DTI, ...)."""

from .diffusion import DKI, DTI
from .registry import available, get
from .relaxometry import InversionRecovery, MolliT1, MonoExp, VfaT1, recovery_start

__all__ = [
    "DTI",
    "DKI",
    "MolliT1",
    "InversionRecovery",
    "VfaT1",
    "MonoExp",
    "recovery_start",
    "get",
    "available",
]
