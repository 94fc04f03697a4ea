"""The package itself: lazy subpackages and what a bare install provides."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qmrkit


@pytest.mark.parametrize("name", qmrkit._SUBPACKAGES)
def test_every_subpackage_is_lazily_importable(name):
    mod = getattr(qmrkit, name)
    assert mod.__name__ == f"qmrkit.{name}"
    assert name in qmrkit.__all__


def test_import_qmrkit_imports_no_subpackage_or_heavy_dependency():
    code = (
        "import sys, qmrkit; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'ismrmrd', 'h5py', 'nibabel', 'scipy', 'matplotlib') or m.startswith('qmrkit.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_dependencies_cover_the_demo_and_raw_data():
    """``make demo`` installs only the core dependencies: raw-data I/O must be among them."""
    from importlib.metadata import requires

    core = {
        r.split(">")[0].split("=")[0].strip().lower()
        for r in requires("qmrkit") or []
        if "extra ==" not in r
    }
    assert {"torch", "numpy", "ismrmrd", "h5py", "nibabel", "prometheus-client"} <= core
