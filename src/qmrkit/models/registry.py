"""Models by name, for the CLI, protocol files and the service."""

from __future__ import annotations

from typing import Any

from ..errors import ParameterError, UnknownNameError
from ..fit.model import Model
from .relaxometry import InversionRecovery, MolliT1, MonoExp, VfaT1

_MODELS: dict[str, tuple[type[Model], dict[str, Any], str]] = {
    "molli": (MolliT1, {}, "MOLLI T1 (3-parameter, Look-Locker corrected); needs ti"),
    "ir": (InversionRecovery, {}, "inversion recovery T1 with inversion efficiency; needs ti"),
    "vfa": (VfaT1, {}, "variable flip angle T1 (DESPOT1), optional B1; needs flip_angles, tr"),
    "t2": (MonoExp, {"kind": "T2"}, "mono-exponential T2; needs te"),
    "t2star": (MonoExp, {"kind": "T2star"}, "mono-exponential T2*; needs te"),
    "r2star": (MonoExp, {"kind": "R2star"}, "mono-exponential R2* (1/s); needs te"),
    "monoexp": (MonoExp, {}, "mono-exponential decay of kind T2|T2star|R2|R2star; needs te"),
}


def available() -> dict[str, str]:
    """Model names and one-line descriptions."""
    return {k: v[2] for k, v in _MODELS.items()}


def check_name(name: str) -> str:
    """The registry key for ``name``, or an error listing the available models."""
    key = name.lower().replace("-", "").replace("_", "")
    key = {"t2*": "t2star", "inversionrecovery": "ir", "despot1": "vfa"}.get(key, key)
    if key not in _MODELS:
        raise UnknownNameError(
            f"unknown model {name!r}; available models: {', '.join(sorted(_MODELS))}"
        )
    return key


def get(name: str, **settings: Any) -> Model:
    """Build a model by name with its acquisition settings.

    >>> get("molli", ti=[100, 180, 260, 1000, 1080, 1900, 2000, 2800])
    """
    key = check_name(name)
    cls, defaults, _ = _MODELS[key]
    try:
        return cls(**{**defaults, **settings})
    except TypeError as exc:
        raise ParameterError(f"model {name!r}: {exc}; {_MODELS[key][2]}") from exc
