"""Process plumbing shared by the processes impala spawns (actors, env workers)."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Has this process get SIGTERM when its parent goes, even if the parent is
    SIGKILLed (Linux PR_SET_PDEATHSIG; elsewhere nothing). Returns False if the
    parent `parent_pid` is already gone (it died before prctl took effect): the
    caller should then exit at once."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent_pid
