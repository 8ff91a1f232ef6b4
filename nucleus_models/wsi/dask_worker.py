"""Set up at every start of a local dask cluster's worker process (a dask
preload, named in ``runner._run_dask``): the first workers and those a nanny
restarts later alike."""

from __future__ import annotations

import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    """SIGINT ignored, as the first workers inherit it from the run's start.

    A terminal's Ctrl-C reaches the whole process group, the workers with
    it: the run's process stops them, and a worker taking it itself printed
    two screens of dask's asyncio traceback. A worker restarted by its nanny
    (after a crash, or killed for memory) is spawned by the run's process
    once its SIGINT handler is back, so it inherits nothing: this sets it,
    ~1 s into the worker's start (a Ctrl-C before then still reaches it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
