"""benchmarks/gpu_check.py in CPU mode: it runs end to end and says what it skipped and why."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, *args) -> dict:
    gc = _module()
    rc = gc.main(["--cpu", "--out", str(tmp_path), "--wheels", str(tmp_path / "none"), *args])
    report = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    assert rc == (0 if report["ok"] else 1)
    return report


def test_parse_pytest_log_plain_xdist_and_cut_off():
    log = "\n".join(
        [
            "tests/ops/test_a.py::test_x[cuda] PASSED                [  1%]",
            "[gw1] [  2%] FAILED tests/nufft/test_b.py::test_y[cuda-2] ",
            "[gw0] [  3%] SKIPPED tests/fit/test_c.py::test_z[cuda] ",
            "tests/recon/test_d.py::test_w[cuda] ERROR",
            "ERROR collecting tests/io/test_dicom.py",
            "[gw0] [  4%] PASSED tests/ops/test_a.py::test_v[cuda] ",
            "tests/ops/test_a.py::test_u[cuda]",  # started, cut off before its outcome
        ]
    )
    res = _module()._parse_pytest(log)
    assert res["counts"] == {"passed": 2, "failed": 1, "skipped": 1, "error": 1}
    assert res["failed"] == [
        "tests/nufft/test_b.py::test_y[cuda-2]",
        "tests/recon/test_d.py::test_w[cuda]",
    ]
    assert res["collection_errors"] == ["tests/io/test_dicom.py"]


def test_cuda_parametrised_tests_carry_the_gpu_mark():
    """tests/conftest.py marks every CUDA-parametrised test `gpu`, so `-m gpu` selects them all."""
    ops = "tests/ops/test_adjoint.py"  # its conftest parametrises cuda without the mark
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    all_ids = subprocess.run([*collect, ops], cwd=ROOT, capture_output=True, text=True).stdout
    gpu_ids = subprocess.run(
        [*collect, "-m", "gpu", ops], cwd=ROOT, capture_output=True, text=True
    ).stdout
    ids = [line for line in all_ids.splitlines() if "::" in line]
    gpu = [line for line in gpu_ids.splitlines() if "::" in line]
    expected = [i for i in ids if "cuda" in i]
    assert len(expected) > 10
    assert gpu == expected


@pytest.fixture(scope="module")
def full_cpu_report(tmp_path_factory) -> dict:
    """One end-to-end CPU-mode run (every part, ``--scale 4``) shared by the tests that read its
    report: the env and tests parts run the same code whether or not the other parts follow (the
    ``--parts`` selection itself is exercised by the budget test), so a second run of those two
    alone (≈ 15-35 s, mostly importing every package and collecting the gpu tests) adds nothing."""
    # budgets sized for a GPU machine; 2 CPU cores are slow
    return _run(tmp_path_factory.mktemp("gpu_check"), "--scale", "4")


@pytest.mark.slow
def test_cpu_mode_states_what_it_skipped(full_cpu_report):
    report = full_cpu_report
    assert report["mode"] == "cpu" and report["mode_reason"] == "--cpu given"
    assert (
        report["wheels"]["status"] == "skipped" and "does not exist" in report["wheels"]["reason"]
    )
    env, tests = report["parts"]["env"], report["parts"]["tests"]
    assert env["status"] == "ok" and env["qmrkit"] == str(ROOT / "src" / "qmrkit")
    assert set(env["packages"]) >= {"finufft", "cufinufft", "nibabel", "emcee"}
    assert tests["status"] == "skipped" and tests["reason"].startswith("no CUDA device")
    assert report["ok"] is True


def test_spent_budget_skips_the_rest_with_the_reason(tmp_path):
    report = _run(tmp_path, "--parts", "lm,mcmc", "--budget", "4")
    for part in ("lm", "mcmc"):
        assert report["parts"][part] == {
            "status": "skipped",
            "reason": "the overall budget is spent",
        }


@pytest.mark.slow
def test_cpu_mode_end_to_end_sanity_figures(full_cpu_report):
    """Every benchmark part runs its small CPU version; its figures are checked against truth."""
    report = full_cpu_report
    parts = report["parts"]
    assert set(parts) == {"env", "tests", "nufft", "lm", "mcmc", "mrf", "mel"}
    assert report["ok"] is True, {k: v.get("reason") for k, v in parts.items()}
    for name in ("nufft", "lm", "mcmc", "mrf", "mel"):
        assert parts[name]["status"] == "ok"
        assert parts[name]["skipped"].startswith("no CUDA device")
    row = parts["nufft"]["rows"][0]
    # requested ε = 1e-6 against a float64 direct NDFT on 256 points (complex64 floor ≈ 1e-6)
    assert row["torch_err_vs_ndft"] < 5e-6 and row["torch_forward_s"] > 0
    assert "cufinufft_forward_s" not in row
    # MOLLI at SNR 50: the batched LM's median T1 error is ≈ 1 % (benchmarks/fit_relaxometry.py)
    assert parts["lm"]["median_t1_err"] < 0.03 and parts["lm"]["converged"] > 0.95
    run = parts["mcmc"]["runs"][0]
    assert run["mean_D_in_bounds"] and 0.1 < run["acceptance"] < 0.9 and run["median_ess_D"] > 10
    mrf = parts["mrf"]
    # a dictionary grid step of 25 % bounds the quantisation error at ≈ 12 %
    assert mrf["median_t1_err"] < 0.15 and mrf["spheres"] >= 10
    assert mrf["scan_to_maps_s"] > 0 and set(mrf["stages"]) >= {"subspace_recon", "matching"}
    assert parts["mel"]["rows"][0]["peak_mb"] > 0
