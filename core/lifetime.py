"""No process of the service outlives the one that started it.

Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) is sent to a process
when the thread that started it exits, however it exits (SIGKILL, the OOM
killer): the embedded servers and Sanic's main process get it from the stack
launcher, Sanic's workers and managed processes from Sanic's main process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def signal_on_parent_death(signum: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies.

    ``parent`` is the pid the caller expects as its parent: if that one is already
    gone (it died before the signal was armed), this process exits at once.
    """
    if not sys.platform.startswith("linux"):
        return
    if _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent is not None and os.getppid() != parent:
        os._exit(1)
