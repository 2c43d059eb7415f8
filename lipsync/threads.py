"""Names the operating system shows for lipsync's threads (`/proc/<pid>/task/<tid>/comm`, `top -H`, py-spy).

Python's thread names are its own: without this every thread of a server reads "python" to the OS, and the CPU a
loaded server spends cannot be told apart by job. Threads a named thread starts (torch's OpenMP workers, for one)
inherit its name, so their CPU counts to the stage that started them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

OS_NAME_CHARS = 15  # Linux keeps 16 bytes, the last one NUL
_PR_SET_NAME = 15  # prctl option (linux/prctl.h)
_libc = None


def name_this_thread(name: str) -> None:
    """Give the calling thread `name` as the OS sees it (cut to 15 characters; a no-op off Linux)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:OS_NAME_CHARS]), 0, 0, 0)


def named_pool(workers: int, name: str, initializer: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """A thread pool whose threads the OS shows as `name` (Python's own name too), then run `initializer`."""

    def start() -> None:
        name_this_thread(name)
        if initializer is not None:
            initializer()

    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=start)


def os_name(thread: threading.Thread | None = None) -> str:
    """The OS name of a thread of this process (the calling one by default); "" where the OS does not say."""
    tid = (thread or threading.current_thread()).native_id
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def native_thread_ids() -> set[int]:
    """Ids of this process's threads that Python did not start (an engine's or a math library's own workers)."""
    try:
        tids = {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()
    return tids - {t.native_id for t in threading.enumerate()}


def name_threads(tids: set[int], name: str, only_named: str | None = None) -> None:
    """Give threads of this process `name` as the OS sees it (those still called `only_named`, if given: the
    name they inherited, not one their library chose): used for the workers an engine starts while it loads,
    which would otherwise carry the name of the thread that loaded it."""
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm", "r+") as f:
                if only_named is None or f.read().strip() == only_named[:OS_NAME_CHARS]:
                    f.seek(0)
                    f.write(name[:OS_NAME_CHARS])
        except OSError:
            pass  # ended meanwhile, or not ours to rename
