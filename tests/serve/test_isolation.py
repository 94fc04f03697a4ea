"""``--isolate``: each reconstruction in a process of its own, with time and memory budgets.

A crashing, runaway or memory-hungry scan ends its own session with an error; a concurrent good
scan returns values equal to the in-process fit, and the server goes on.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from qmrkit.errors import ParameterError
from qmrkit.pipelines import fit_maps
from qmrkit.serve import Server, exchange
from qmrkit.serve.mrd_images import image_to_array
from qmrkit.sim import MOLLI_TI, molli_series

from . import isolation_handlers  # noqa: F401  (registers the test pipelines here too)
from .helpers import BackgroundServer, header_xml, series_images

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork"), reason="process isolation is tested where fork is available"
)


def _molli(seed=4, shape=(10, 8)):
    t1 = np.random.default_rng(seed).uniform(500, 1800, shape)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=80, seed=seed)
    return series.astype(np.float32)


async def _fit(port):
    series = _molli()
    r = await exchange(
        "127.0.0.1", port, config="fit:molli", header_xml=header_xml(ti=MOLLI_TI),
        images=series_images(series),
    )  # fmt: skip
    return series, r


def _check_fit(series, r):
    assert not r.errors, r.texts
    (t1,) = [image_to_array(i) for i in r.images if "T1map" in str(i.meta["SeriesDescription"])]
    ref = fit_maps(series, "molli", {"ti": list(MOLLI_TI)}, mask="auto")["T1"].numpy()
    np.testing.assert_allclose(t1, np.nan_to_num(ref), rtol=1e-6)


def test_budgets_need_isolation():
    with pytest.raises(ParameterError, match="--isolate"):
        Server(scan_time_budget_s=1.0)


@pytest.mark.slow
def test_crash_timeout_and_memory_end_only_their_session():
    with BackgroundServer(
        isolate=True,
        max_concurrent=2,
        scan_time_budget_s=20.0,
        scan_memory_budget_bytes=600 << 20,
        pipeline_modules=("tests.serve.isolation_handlers",),
    ) as srv:

        async def go(config):
            return await exchange("127.0.0.1", srv.port, config=config, header_xml=header_xml())

        async def scenario():
            crash = asyncio.create_task(go("test-crash"))
            good = asyncio.create_task(_fit(srv.port))
            return await crash, await good

        crash, (series, good) = asyncio.run(scenario())
        assert crash.errors and "died of SIGSEGV" in crash.errors[0], crash.texts
        _check_fit(series, good)

        t0 = time.monotonic()
        memory = asyncio.run(go("test-allocate:4000"))
        assert memory.errors and "memory budget of 600 MiB" in memory.errors[0], memory.texts
        assert time.monotonic() - t0 < 60

        pids = {asyncio.run(go("test-pid")).texts[0] for _ in range(2)}
        assert len(pids) == 2 and str(os.getpid()) not in " ".join(pids)  # a process per scan
        series, good = asyncio.run(_fit(srv.port))
        _check_fit(series, good)


@pytest.mark.slow
def test_a_runaway_scan_is_stopped_at_its_time_budget():
    with BackgroundServer(
        isolate=True,
        scan_time_budget_s=6.0,
        pipeline_modules=("tests.serve.isolation_handlers",),
    ) as srv:
        t0 = time.monotonic()
        r = asyncio.run(
            exchange("127.0.0.1", srv.port, config="test-sleep:600", header_xml=header_xml())
        )
        elapsed = time.monotonic() - t0
        assert r.errors and "time budget of 6 s" in r.errors[0], r.texts
        assert elapsed < 15, elapsed
        series, good = asyncio.run(_fit(srv.port))  # the slot is free again
        _check_fit(series, good)
