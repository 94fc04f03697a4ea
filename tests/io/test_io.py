import numpy as np
import pytest

from qmrkit.errors import DataFileError, ParameterError
from qmrkit.io import load_nifti, load_protocol, save_nifti


def test_nifti_roundtrip_keeps_values_nans_and_affine(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a[0, 0, 0] = np.nan
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    save_nifti(tmp_path / "a.nii.gz", a, affine=aff)
    b, aff2 = load_nifti(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(aff, aff2)


def test_protocol(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("model: vfa\nflip_angles: [3, 15]\ntr: 15\n")
    assert load_protocol(p) == {"model": "vfa", "flip_angles": [3, 15], "tr": 15}
    p.write_text("te: [1, 2]\nTE: 3\n")
    with pytest.raises(ParameterError, match="unknown keys"):
        load_protocol(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(DataFileError, match="mapping"):
        load_protocol(p)
