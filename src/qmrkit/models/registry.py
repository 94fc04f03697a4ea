"""Models by name, for the CLI, protocol files and the service."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ParameterError, UnknownNameError
from ..fit.model import Model
from .diffusion import DTI, SANDI, AxCaliberSMT
from .relaxometry import InversionRecovery, MolliT1, MonoExp, VfaT1

# acquisition setting -> (CLI flag, what it is); the one place that names the flags, so error
# messages and `qmrkit models` say what to type
SETTINGS: dict[str, tuple[str, str]] = {
    "ti": ("--ti", "inversion times in ms"),
    "te": ("--te", "echo times in ms"),
    "flip_angles": ("--fa", "flip angles in degrees"),
    "tr": ("--tr", "repetition time in ms"),
    "b1": ("--b1", "B1 map, fraction of nominal"),
}

# name: (class, fixed keyword arguments, description, required settings)
_MODELS: dict[str, tuple[type[Model], dict[str, Any], str, tuple[str, ...]]] = {
    "molli": (MolliT1, {}, "MOLLI T1 (3-parameter, Look-Locker corrected)", ("ti",)),
    "ir": (InversionRecovery, {}, "inversion recovery T1 with inversion efficiency", ("ti",)),
    "vfa": (VfaT1, {}, "variable flip angle T1 (DESPOT1), optional --b1", ("flip_angles", "tr")),
    "t2": (MonoExp, {"kind": "T2"}, "mono-exponential T2", ("te",)),
    "t2star": (MonoExp, {"kind": "T2star"}, "mono-exponential T2*", ("te",)),
    "r2star": (MonoExp, {"kind": "R2star"}, "mono-exponential R2* (1/s)", ("te",)),
    "monoexp": (MonoExp, {}, "mono-exponential decay of kind T2|T2star|R2|R2star", ("te",)),
}

def _flags(names: tuple[str, ...]) -> str:
    return " and ".join(SETTINGS[n][0] for n in names)


#: diffusion models take a gradient table (``qmrkit.io.load_dwi``), not a protocol YAML; they are
#: listed by ``available(diffusion=True)`` only, until ``qmrkit models``/``qmrkit fit`` know how to
#: build them from DWI files
_DIFFUSION: dict[str, tuple[type[Model], dict[str, Any], str, tuple[str, ...]]] = {
    "dti": (
        DTI,
        {},
        "diffusion tensor (FA, MD, AD, RD, V1); needs bvals (ms/µm²), bvecs (n, 3)",
        (),
    ),
    "axcalibersmt": (
        AxCaliberSMT,
        {},
        "AxCaliberSMT axon diameter (Fan 2020) on shell spherical means; needs b (ms/µm²), "
        "small_delta, big_delta (ms) per shell",
        (),
    ),
    "sandi": (
        SANDI,
        {},
        "SANDI soma/neurite imaging (Palombo 2020) on shell spherical means; needs b (ms/µm²), "
        "small_delta, big_delta (ms) per shell",
        (),
    ),
}


def _entry(key: str) -> tuple[type[Model], dict[str, Any], str, tuple[str, ...]]:
    return _MODELS.get(key) or _DIFFUSION[key]


def available(diffusion: bool = False) -> dict[str, str]:
    """Model names and one-line descriptions (naming the CLI flags each relaxometry model needs;
    with ``diffusion=True`` also the DWI models)."""
    out = {k: f"{v[2]}; needs {_flags(v[3])}" for k, v in _MODELS.items()}
    if diffusion:
        out.update({k: v[2] for k, v in _DIFFUSION.items()})
    return out


def required_settings(name: str) -> tuple[str, ...]:
    """The acquisition settings a model cannot be built without (e.g. ``("ti",)``)."""
    return _entry(check_name(name))[3]


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


def check_settings(name: str, settings: dict[str, Any]) -> None:
    """Raise ParameterError naming the CLI flags when a setting is missing or not used.

    Checked before the model is built, so a missing ``--ti`` reads "needs --ti (inversion times
    in ms)" rather than a Python signature error.
    """
    key = check_name(name)
    cls, fixed, _, required = _entry(key)
    missing = [s for s in required if settings.get(s) is None]
    if missing:
        what = "; ".join(f"{SETTINGS[s][0]} ({SETTINGS[s][1]})" for s in missing)
        keys = ", ".join(missing)
        raise ParameterError(
            f"model {key!r} needs {what}; in a --protocol file or 'qmrkit send --param': {keys}"
        )
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"} - set(fixed)
    unused = [s for s, v in settings.items() if v is not None and s not in accepted]
    if unused:
        named = ", ".join(SETTINGS[s][0] if s in SETTINGS else s for s in unused)
        raise ParameterError(f"model {key!r} does not use {named}; it needs {_flags(required)}")


def get(name: str, **settings: Any) -> Model:
    """Build a model by name with its acquisition settings.

    >>> get("molli", ti=[100, 180, 260, 1000, 1080, 1900, 2000, 2800])
    """
    key = check_name(name)
    check_settings(key, settings)
    cls, fixed, _, _ = _entry(key)
    settings = {k: v for k, v in settings.items() if v is not None}
    try:
        return cls(**{**fixed, **settings})
    except TypeError as exc:
        raise ParameterError(f"model {name!r}: {exc}; {available(diffusion=True)[key]}") from exc
