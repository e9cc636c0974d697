"""Worker process pools that never outlive the process that started them.

``prepare``, ``analyze`` / ``evaluate --structure`` and corpus export encode files in a
``ProcessPoolExecutor`` (spawn start method: workers never inherit the parent's threads or locks).
When the parent is killed with SIGKILL it cannot shut its pool down, and plain workers would sit
idle (tens of MB each) until someone kills them. Every worker started by ``process_pool`` therefore

- asks Linux to send it SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)`` through ctypes),
  then checks that the parent did not already die before that call; and
- on every platform, runs a daemon thread that polls the parent's pid once a second and exits the
  worker when the parent is gone (``os.getppid()`` changes when a process is re-parented).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_SECONDS = 1.0


def _set_parent_death_signal() -> None:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux; silently nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _watch_parent(parent_pid: int) -> None:
    """Exit this process as soon as ``parent_pid`` is no longer its parent."""
    stop = threading.Event()
    while not stop.wait(POLL_SECONDS):
        if os.getppid() != parent_pid:
            os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: this worker ends when the process ``parent_pid`` ends."""
    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn-context ``ProcessPoolExecutor`` whose workers exit when this process dies."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))
