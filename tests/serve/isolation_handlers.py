"""Pipelines that misbehave on purpose, for the isolation tests (registered on import, in the
server's process and in its isolated workers through ``pipeline_modules``)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from qmrkit.serve import register


@register("test-sleep")
def _sleep(session, arg):
    time.sleep(float(arg or 60))
    return ["slept"]


@register("test-allocate")
def _allocate(session, arg):
    blocks = []
    for _ in range(int(arg or 4000)):  # MiB, touched so they are resident
        blocks.append(np.ones(1 << 17))
        time.sleep(0.001)
    return [f"allocated {len(blocks)} MiB"]


@register("test-crash")
def _crash(session, arg):
    os.kill(os.getpid(), signal.SIGSEGV)
    return []


@register("test-pid")
def _pid(session, arg):
    return [f"pid {os.getpid()}"]
