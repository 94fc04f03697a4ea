"""Models check their acquisition settings: missing ones name the CLI flag, wrong units warn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from qmrkit import models
from qmrkit.errors import ParameterError, UnitsWarning
from qmrkit.sim import MOLLI_TI


@pytest.mark.parametrize(
    "name, settings, message",
    [
        ("molli", {}, "needs --ti (inversion times in ms)"),
        ("ir", {}, "needs --ti"),
        ("vfa", {"tr": 15}, "needs --fa (flip angles in degrees)"),
        ("vfa", {"flip_angles": [3, 15]}, "needs --tr (repetition time in ms)"),
        ("t2", {}, "needs --te (echo times in ms)"),
        ("t2star", {"ti": [1, 2]}, "needs --te"),
        ("molli", {"ti": MOLLI_TI, "te": [1, 2]}, "does not use --te"),
        ("t2", {"te": [10, 20], "kind": "R2"}, "does not use kind"),
    ],
)
def test_missing_or_unused_settings(name, settings, message):
    with pytest.raises(ParameterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        models.get(name, **settings)


@pytest.mark.parametrize(
    "build, text",
    [
        (
            lambda: models.VfaT1(np.deg2rad([3, 15]), 15.0),
            "flip_angles = [0.0524, 0.262] look like radians",
        ),
        (lambda: models.VfaT1([3, 15], 0.015), "tr = 0.015 looks like seconds"),
        (lambda: models.MolliT1(np.asarray(MOLLI_TI) / 1000), "ti = [0.1, 0.18"),
        (
            lambda: models.InversionRecovery([0.05, 0.5, 2.0]),
            "ti = [0.05, 0.5, 2] look like seconds",
        ),
        (
            lambda: models.MonoExp([0.01, 0.02, 0.04], kind="T2"),
            "te = [0.01, 0.02, 0.04] look like",
        ),
    ],
)
def test_values_in_the_wrong_unit_warn(build, text):
    with pytest.warns(UnitsWarning, match=text.replace("[", r"\[")) as rec:
        model = build()
    assert len(rec) == 1 and "fitting as given" in str(rec[0].message)
    assert rec[0].filename == __file__  # attributed to the code that built the model
    assert model.n_measurements >= 2  # and the model is built as asked


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.VfaT1([2, 10, 20], 5.0),
        lambda: models.MolliT1(MOLLI_TI),
        lambda: models.InversionRecovery([50, 500, 2000]),
        lambda: models.MonoExp([1.5, 3.0, 4.5, 6.0, 7.5, 9.0], kind="R2star"),  # liver R2* echoes
        lambda: models.MonoExp([10, 20, 40], kind="T2"),
    ],
)
def test_plausible_protocols_do_not_warn(build):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", UnitsWarning)
        model = build()
    assert [w for w in rec if issubclass(w.category, UnitsWarning)] == []
    assert model.n_measurements >= 3  # built as asked, settings kept as given (no rescaling)
    first = next(iter(model.acquisition.values()))
    assert float(first.max()) > 1.0
