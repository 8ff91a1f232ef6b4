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
    (after a crash, or killed for memory) is started by this process's
    event loop thread, with SIGINT as this process has it again by then."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
