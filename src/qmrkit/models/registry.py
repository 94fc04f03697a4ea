"""Models by name, for the CLI, protocol files and the service."""

from __future__ import annotations

from typing import Any

from ..errors import ParameterError, UnknownNameError
from ..fit.model import Model
from .diffusion import DTI
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

#: diffusion models take a gradient table (``qmrkit.io.load_dwi``), not a protocol YAML; they are
#: listed by ``available(diffusion=True)`` only, until ``qmrkit models``/``qmrkit fit`` know how to
#: build them from DWI files (the CLI's example settings cover the relaxometry models)
_DIFFUSION: dict[str, tuple[type[Model], dict[str, Any], str]] = {
    "dti": (DTI, {}, "diffusion tensor (FA, MD, AD, RD, V1); needs bvals (ms/µm²), bvecs (n, 3)"),
}


def available(diffusion: bool = False) -> dict[str, str]:
    """Model names and one-line descriptions (relaxometry; with ``diffusion=True`` also DWI)."""
    out = {k: v[2] for k, v in _MODELS.items()}
    if diffusion:
        out.update({k: v[2] for k, v in _DIFFUSION.items()})
    return out


def check_name(name: str) -> str:
    """The registry key for ``name``, or an error listing the available models."""
    key = name.lower().replace("-", "").replace("_", "")
    key = {"t2*": "t2star", "inversionrecovery": "ir", "despot1": "vfa"}.get(key, key)
    if key not in _MODELS and key not in _DIFFUSION:
        raise UnknownNameError(
            f"unknown model {name!r}; available models: "
            f"{', '.join(sorted({**_MODELS, **_DIFFUSION}))}"
        )
    return key


def get(name: str, **settings: Any) -> Model:
    """Build a model by name with its acquisition settings.

    >>> get("molli", ti=[100, 180, 260, 1000, 1080, 1900, 2000, 2800])
    """
    key = check_name(name)
    cls, defaults, text = _MODELS.get(key) or _DIFFUSION[key]
    try:
        return cls(**{**defaults, **settings})
    except TypeError as exc:
        raise ParameterError(f"model {name!r}: {exc}; {text}") from exc
