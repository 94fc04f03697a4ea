"""`qmrkit send` end to end through a real socket: what comes back equals the in-process fit."""

from __future__ import annotations

import numpy as np

from qmrkit import fit, models
from qmrkit.cli import main
from qmrkit.io import load_nifti
from qmrkit.io.mrd import write_mrd_images
from qmrkit.sim import MOLLI_TI, molli_series
from tests.serve.helpers import BackgroundServer


def test_images_written_by_qmrkit_are_sendable_to_fit(tmp_path, capsys):
    """A file from write_mrd_images has no XML header: send builds one from the images, the
    settings come from --param, and the maps equal fit.lm on the same series."""
    t1 = np.random.default_rng(4).uniform(500, 1800, (7, 5))
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=150, seed=4)
    series = series.astype(np.float32)  # (x, y, n): NIfTI order, measurement axis last
    # array order (n, y, x): one ISMRMRD image per measurement
    write_mrd_images(tmp_path / "molli.h5", series.transpose(2, 1, 0), fov_mm=(140.0, 100.0))
    ti = "[" + ",".join(f"{t:g}" for t in MOLLI_TI) + "]"
    with BackgroundServer() as srv:
        rc = main(
            [
                "send",
                str(tmp_path / "molli.h5"),
                "--config",
                "fit:molli",
                "--port",
                str(srv.port),
                "--param",
                f"ti={ti}",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "has no XML header: sending a minimal one built from its 8 images" in captured.out
    got, _ = load_nifti(tmp_path / "out" / "T1map.nii.gz")
    direct = fit.lm(models.MolliT1(MOLLI_TI), series, progress=False)
    assert got.shape == t1.shape
    np.testing.assert_allclose(got, np.nan_to_num(direct["T1"].numpy()), rtol=1e-6)
    assert np.median(np.abs(got - t1) / t1) < 0.02  # and it is the right answer


def test_header_from_images_describes_matrix_and_fov():
    import ismrmrd
    from ismrmrd.xsd import CreateFromDocument

    from qmrkit.serve.client import header_from_images

    img = ismrmrd.Image.from_array(np.zeros((1, 6, 10), np.float32))  # (z, y, x)
    img.field_of_view[:] = (200.0, 120.0, 5.0)
    hdr = CreateFromDocument(header_from_images([img]).encode())
    enc = hdr.encoding[0].reconSpace
    assert (enc.matrixSize.x, enc.matrixSize.y, enc.matrixSize.z) == (10, 6, 1)
    assert (enc.fieldOfView_mm.x, enc.fieldOfView_mm.y, enc.fieldOfView_mm.z) == (200, 120, 5)
