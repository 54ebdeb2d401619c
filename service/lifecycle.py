"""Child processes that never outlive their parent, even when it is killed with ``kill -9``.

On Linux the kernel sends a chosen signal to a process when its parent dies (``PR_SET_PDEATHSIG``);
``die_with_parent(sig)`` is the ``preexec_fn`` that asks for it in the child, between fork and exec.
The request is checked against a parent that already died in that gap. The kernel ties it to the
*thread* that started the child (the child would be signalled when that thread ends), so it is asked
for only from the main thread; started from another thread, or off Linux, the child gets no such signal
and its own watchdog (workers poll their parent's pid) or its owner's ``stop()`` is what remains.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from typing import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this process dies."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)   # loaded before the fork
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:          # the parent died before the request was in place
            os.kill(os.getpid(), sig)
    return preexec
