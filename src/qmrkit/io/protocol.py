"""Acquisition protocol files (YAML): the settings a model needs, with units in the keys' docs.

Example ``protocol.yaml``::

    model: molli
    ti: [100, 180, 260, 1000, 1080, 1900, 2000, 2800]   # ms

Recognised keys: ``model``, ``ti`` (ms), ``te`` (ms), ``tr`` (ms), ``flip_angles`` (degrees),
``kind`` (for mono-exponential models), ``offset``; for the myelin water models ``fixed``
(parameter name -> value held constant, physical units) and, for ``mcr-mwi``, ``surrogate`` (a
``.safetensors`` file from :func:`~qmrkit.models.myelin.train_mcr_mwi_surrogate`, relative to the
protocol file) and the fixed EPG-X settings ``t1_mw``, ``t2_mw``, ``t2_iew`` (ms) and
``spoil_increment`` (degrees).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataFileError, ParameterError

KNOWN_KEYS = {
    "model",
    "ti",
    "te",
    "tr",
    "flip_angles",
    "kind",
    "offset",
    "description",
    "fixed",
    "surrogate",
    "t1_mw",
    "t2_mw",
    "t2_iew",
    "spoil_increment",
}


def load_protocol(path: str | Path) -> dict[str, Any]:
    """Read a protocol YAML file into a dict of acquisition settings."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise DataFileError(f"protocol file not found: {p}")
    try:
        content = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise DataFileError(f"protocol file {p} is not valid YAML: {exc}") from exc
    if not isinstance(content, dict):
        raise DataFileError(
            f"protocol file {p} must hold a mapping of settings, got {type(content).__name__}"
        )
    unknown = set(content) - KNOWN_KEYS
    if unknown:
        raise ParameterError(
            f"protocol file {p} has unknown keys {sorted(unknown)}; known keys: {sorted(KNOWN_KEYS)}"
        )
    return content
