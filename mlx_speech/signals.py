"""SIGTERM and SIGHUP handled like Ctrl-C, so every command's cleanup runs.

A command that converts a model, writes audio or serves requests keeps its temporary files
until the end and removes (or finalizes) them in its ``except KeyboardInterrupt`` path. A
terminal closing (SIGHUP) or ``kill`` (SIGTERM) would otherwise end the process without that
path and leave gigabytes behind; ``graceful_signals`` raises ``Terminated``, a
``KeyboardInterrupt``, for them instead.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

# The signals that ask a process to stop; SIGHUP does not exist on Windows.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGTERM or SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Terminated(signum)


@contextmanager
def graceful_signals():
    """Inside the block, SIGTERM and SIGHUP raise ``Terminated`` in the main thread.

    Outside the main thread (where Python cannot install handlers) it does nothing. The
    previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's exit status for a stop: 128 + the signal number (130 for Ctrl-C)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)
