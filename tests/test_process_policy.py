"""The process policy of ``qmrkit._threads`` (the CLI, the server and batch workers apply it):
the heap rule, measured by what it is for — page faults of a warm solver call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = """
import json, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from qmrkit import fit, models
from qmrkit._threads import keep_heap
applied = keep_heap() if sys.argv[1] == "policy" else False
rng = np.random.default_rng(0)
ti = np.array([100.0, 180, 260, 1000, 1080, 1900, 2000, 2800])
t1 = rng.uniform(300, 2000, 16384)
a = 1000.0
clean = np.abs(a - 2 * a * np.exp(-ti / (0.85 * t1[:, None])))
data = clean + rng.normal(0, 20, clean.shape)
model = models.MolliT1(ti)
fits = [fit.lm(model, data, progress=False) for _ in range(2)]  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    res = fit.lm(model, data, progress=False)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"applied": applied, "faults": faults, "t1": float(np.nanmedian(res["T1"]))}))
"""


def _run(mode: str, extra_env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC, **(extra_env or {})}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the heap rule is glibc's mallopt")
def test_keep_heap_removes_the_page_faults_of_warm_solver_calls():
    with_policy = _run("policy")
    if not with_policy["applied"]:
        pytest.skip("this C library has no glibc mallopt (e.g. musl): the rule does not apply")
    without = _run("default")
    # measured on the 2-core development machine: 2,600-6,300 minor faults per call with glibc's
    # defaults, 26-120 with the rule; the maps are the same
    assert with_policy["faults"] < 500 < without["faults"], (with_policy, without)
    assert with_policy["t1"] == without["t1"]


def test_keep_heap_respects_the_opt_out():
    # QMRKIT_MALLOC=default, or glibc's own variables set by the user: malloc is left alone
    assert _run("policy", {"QMRKIT_MALLOC": "default"})["applied"] is False
    code = "from qmrkit._threads import keep_heap; print(keep_heap())"
    env = {**os.environ, "PYTHONPATH": SRC, "MALLOC_TRIM_THRESHOLD_": "1000000"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_public_configure_process_applies_the_policy_before_torch():
    # qmrkit.configure_process is the opt-in for scripts and notebooks: threads, the OpenMP wait
    # policy (set before torch starts its OpenMP runtime) and, on glibc, the heap rule
    code = (
        "import json, os, qmrkit; n = qmrkit.configure_process(1); import torch; "
        "from qmrkit import _threads; print(json.dumps([n, os.environ['OMP_WAIT_POLICY'], "
        "os.environ['OMP_NUM_THREADS'], torch.get_num_threads(), _threads._HEAP_DONE]))"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "QMRKIT_NUM_THREADS", "QMRKIT_MALLOC"):
        env.pop(k, None)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    n, wait, omp, torch_threads, heap = json.loads(out.stdout.strip().splitlines()[-1])
    assert (n, wait, omp, torch_threads) == (1, "PASSIVE", "1", 1)
    assert heap is sys.platform.startswith("linux")
