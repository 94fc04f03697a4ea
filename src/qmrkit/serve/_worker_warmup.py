"""Imported once by the forkserver of isolated workers (:mod:`qmrkit.serve.isolation`): runs a
tiny fit of every relaxometry model, so that torch's lazily built forward-mode machinery (≈1.5 s
quiet, 10 s on a loaded machine) is inherited by every forked worker instead of rebuilt per scan.

It runs single-threaded: an OpenMP thread pool started in the forkserver would be inherited,
broken, by its forks. Workers set their own thread count (:func:`worker_threads`).
"""

from __future__ import annotations

import torch

_THREADS = torch.get_num_threads()


def _warm_up() -> None:
    import numpy as np

    from ..fit import lm
    from ..models import registry

    torch.set_num_threads(1)
    examples = {
        "molli": {"ti": [100.0, 180.0, 260.0, 1000.0, 1080.0, 1900.0, 2000.0, 2800.0]},
        "ir": {"ti": [100.0, 400.0, 1200.0, 3000.0]},
        "vfa": {"flip_angles": [3.0, 10.0, 20.0], "tr": 15.0},
        "t2": {"te": [10.0, 30.0, 60.0, 90.0]},
    }
    for name, settings in examples.items():
        model = registry.get(name, **settings)
        truth = {p.name: np.full((2, 1), p.typical()) for p in model.parameters}
        data = model.simulate(truth).numpy().astype(np.float32)
        lm(model, data, progress=False, max_iter=3)


def worker_threads() -> None:
    """In a forked worker: the thread count the server process had."""
    torch.set_num_threads(_THREADS)


try:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _warm_up()
except Exception:  # a warm-up is an optimisation; a worker without it still works
    pass
