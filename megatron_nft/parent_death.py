"""Child processes die with the process that started them, even when it is SIGKILLed.

A trainer killed by the OOM killer, by Slurm after KillWait or by `kill -9` runs no clean-up: grading
workers blocked in sympy, rollout servers and test ranks it started would live on, holding memory
and GPUs (seen: a grading worker and multiprocessing's resource tracker kept alive until killed by
hand). Each such child calls `die_with_parent()` first thing: on Linux the kernel then sends it
SIGKILL when its parent exits (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent
and exits the process when it is gone.

Standard library only: grading workers import this and must stay free of torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent(poll_s: float = 1.0) -> None:
    """Call in the child. The parent is the process (on Linux: the thread) that forked this one: start
    long-lived children from a thread that lives as long as they should (the main thread)."""
    parent = os.getppid()
    if sys.platform.startswith("linux") and _prctl_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)
        return
    threading.Thread(target=_watch, args=(parent, poll_s), daemon=True, name="die-with-parent").start()


def preexec_die_with_parent() -> None:
    """For subprocess.Popen(preexec_fn=...): runs in the child between fork and exec (the setting
    survives exec)."""
    if sys.platform.startswith("linux"):
        _prctl_pdeathsig(signal.SIGKILL)


def _prctl_pdeathsig(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)
