"""Models by name, for the CLI, protocol files and the service."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParameterError, UnknownNameError
from ..fit.model import Model
from .diffusion import DKI, DTI, NEXI, SANDI, AxCaliberSMT
from .myelin import McrMwi, ThreePoolGRE
from .relaxometry import InversionRecovery, MolliT1, MonoExp, VfaT1

# acquisition setting -> (CLI flag, what it is); the one place that names the flags, so error
# messages and `qmrkit models` say what to type
SETTINGS: dict[str, tuple[str, str]] = {
    "ti": ("--ti", "inversion times in ms"),
    "te": ("--te", "echo times in ms"),
    "flip_angles": ("--fa", "flip angles in degrees"),
    "tr": ("--tr", "repetition time in ms"),
    "b1": ("--b1", "B1 map, fraction of nominal"),
    "surrogate": ("--surrogate", "trained MCR-MWI EPG-X surrogate, .safetensors"),
    "fixed": ("--fix", "parameters held constant, NAME=VALUE in physical units"),
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
    "three-pool-gre": (
        ThreePoolGRE,
        {},
        "three-pool complex multi-echo GRE myelin water (Nam 2015), complex data; MWF derived; "
        "optional --fix (e.g. df_MW=5,df_AW=-2)",
        ("te",),
    ),
    "mcr-mwi": (
        McrMwi,
        {},
        "MCR-MWI myelin water (Chan & Marques 2020): multi-echo x multi-flip complex GRE "
        "(flip-angle-major), EPG-X T1 weighting (direct, slow, or --surrogate FILE), optional "
        "--b1 and --fix",
        ("flip_angles", "te", "tr"),
    ),
}


def _flags(names: tuple[str, ...]) -> str:
    return " and ".join(SETTINGS[n][0] for n in names)


#: diffusion models take a gradient table (``qmrkit.io.load_dwi``), not a protocol YAML; they are
#: listed by ``available(diffusion=True)`` only, until ``qmrkit models``/``qmrkit fit`` know how to
#: build them from DWI files
_DIFFUSION: dict[str, tuple[type[Model], dict[str, Any], str, tuple[str, ...]]] = {}


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


def _normal(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


#: other spellings (after lower-casing and dropping '-' and '_') -> registry key
_ALIASES = {
    "t2*": "t2star",
    "inversionrecovery": "ir",
    "despot1": "vfa",
    "mcr": "mcr-mwi",
    "mcrmwi": "mcr-mwi",
    "threepool": "three-pool-gre",
    "threepoolgre": "three-pool-gre",
}


def check_name(name: str) -> str:
    """The registry key for ``name``, or an error listing the available models.

    Case, ``-`` and ``_`` do not matter (``MCR_MWI``, ``mcrmwi`` and ``mcr-mwi`` are one model).
    """
    key = _normal(name)
    key = _ALIASES.get(key, key)
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


# -- diffusion models built from DWI files ---------------------------------------------------------
# (`qmrkit fit dti|nexi --dwi ...` and :func:`qmrkit.pipelines.diffusion_maps`). A new diffusion
# model needs one `register_diffusion` call below and nothing else: the pipeline, the CLI and
# `qmrkit models` read everything from its DiffusionSpec.

#: DWI timing a model may need -> where a user gives it (for error messages and `qmrkit models`)
DWI_TIMING: dict[str, str] = {
    "small_delta": "gradient duration δ (ms) of every volume: a protocol file with a small_delta "
    "column (--protocol) or a JSON sidecar with SmallDelta in s (--json)",
    "big_delta": "gradient separation Δ (ms) of every volume: a protocol file with a big_delta "
    "column (--protocol) or a JSON sidecar with BigDelta in s (--json)",
}


@dataclass(frozen=True)
class DiffusionSpec:
    """How a diffusion model is built from a :class:`~qmrkit.io.DWI` and what it is fitted to.

    Attributes
    ----------
    cls : type
        The model class.
    fit_to : {"series", "invariants"}
        ``"series"``: built by ``cls.from_dwi(dwi, **fixed)`` and fitted to the DWI volumes (DTI).
        ``"invariants"``: built by ``cls.from_invariants(inv, **fixed)`` from the per-shell
        rotational invariants up to ``l_max``
        (:func:`~qmrkit.models.diffusion.rotational_invariants`) and fitted to those of the orders in ``model.orders`` (default ``(0,)``, the spherical
        means), shell by shell (NEXI; AxCaliberSMT and SANDI with ``orders=(0,)``).
    l_max : int
        Highest invariant order computed (``"invariants"`` only).
    needs : tuple of str
        DWI timing the model cannot be built without (keys of :data:`DWI_TIMING`).
    fixed : dict
        Keyword arguments for the builder (e.g. ``{"orders": (0,)}``).
    """

    cls: type[Model]
    fit_to: str
    l_max: int = 0
    needs: tuple[str, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)


DIFFUSION_SPECS: dict[str, DiffusionSpec] = {}


def register_diffusion(
    name: str,
    cls: type[Model],
    description: str,
    *,
    fit_to: str,
    l_max: int = 0,
    needs: tuple[str, ...] = (),
    fixed: dict[str, Any] | None = None,
) -> None:
    """Make a diffusion model known to ``qmrkit fit NAME --dwi ...``, ``qmrkit models`` and
    :func:`qmrkit.pipelines.diffusion_maps` (see :class:`DiffusionSpec` for the arguments)."""
    if fit_to not in ("series", "invariants"):
        raise ParameterError(f"fit_to must be 'series' or 'invariants', got {fit_to!r}")
    unknown = set(needs) - set(DWI_TIMING)
    if unknown:
        raise ParameterError(f"needs must be among {sorted(DWI_TIMING)}, got {sorted(unknown)}")
    builder = "from_dwi" if fit_to == "series" else "from_invariants"
    if not hasattr(cls, builder):
        raise ParameterError(f"{cls.__name__} has no {builder}() to build it from DWI data")
    _DIFFUSION[name] = (cls, dict(fixed or {}), description, ())
    DIFFUSION_SPECS[name] = DiffusionSpec(cls, fit_to, int(l_max), tuple(needs), dict(fixed or {}))


register_diffusion(
    "dti",
    DTI,
    "diffusion tensor (FA, MD, AD, RD, V1), fitted to the DWI volumes",
    fit_to="series",
)
register_diffusion(
    "dki",
    DKI,
    "diffusion kurtosis (FA, MD, AD, RD, MK, AK, RK), fitted to the DWI volumes; needs two or "
    "more non-zero b-values",
    fit_to="series",
)
register_diffusion(
    "nexi",
    NEXI,
    "NEXI neurite exchange (fn, Dn, De, rn, p2, tex), fitted to the spherical mean and l = 2 "
    "invariant of every shell (b, δ, Δ)",
    fit_to="invariants",
    l_max=2,
    needs=("big_delta",),
)
register_diffusion(
    "axcalibersmt",
    AxCaliberSMT,
    "AxCaliberSMT axon diameter (Fan 2020: a, f, fcsf, DeR; fr, fh), fitted to the spherical "
    "mean of every shell (b, δ, Δ)",
    fit_to="invariants",
    needs=("small_delta", "big_delta"),
)
register_diffusion(
    "sandi",
    SANDI,
    "SANDI soma and neurite density (Palombo 2020: fs, fnr, Dn, Rs, De; fn, fe), fitted to the "
    "spherical mean of every shell (b, δ, Δ); needs two or more diffusion times",
    fit_to="invariants",
    needs=("small_delta", "big_delta"),
)


def diffusion_spec(name: str) -> DiffusionSpec:
    """The :class:`DiffusionSpec` of a diffusion model, or an error naming the diffusion models."""
    key = check_name(name)
    if key not in DIFFUSION_SPECS:
        raise UnknownNameError(
            f"{name!r} is not a diffusion model; diffusion models: {', '.join(DIFFUSION_SPECS)}"
        )
    return DIFFUSION_SPECS[key]


def is_diffusion(name: str) -> bool:
    """True for a model fitted to DWI files (``--dwi``), False for an image-series model."""
    return check_name(name) in DIFFUSION_SPECS


def diffusion_needs(name: str) -> str:
    """What a diffusion model needs, in words naming the CLI flags (for ``qmrkit models``)."""
    spec = diffusion_spec(name)
    text = "needs --dwi, --bvec and --bval (or a --protocol with b)"
    for need in spec.needs:
        text += f"; {DWI_TIMING[need]}"
    return text
