"""Real-time priority for the calling thread (Linux SCHED_FIFO).

The native pacer asks for SCHED_FIFO itself. A consumer that must see each token within
microseconds on a busy machine needs it too: at normal priority the kernel can leave a woken
thread waiting for a time slice (milliseconds) while CPU-bound work runs on every core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def set_thread_realtime(priority: int = 40) -> bool:
    """Put the calling thread at SCHED_FIFO ``priority``; False when the OS refuses.

    Keep the priority below the pacer's (50 by default) so the pacer always runs first.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError):  # refused (no privilege), or not on Linux
        return False
    return True


def set_thread_normal() -> None:
    """Back to the default time-sharing policy."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@contextlib.contextmanager
def realtime_thread(priority: int = 40) -> Iterator[bool]:
    """``with realtime_thread() as granted:`` runs the block at SCHED_FIFO if permitted."""
    granted = set_thread_realtime(priority)
    try:
        yield granted
    finally:
        if granted:
            set_thread_normal()
