"""SIGINT and SIGTERM as one exception, so every ``finally``/``except BaseException`` cleanup runs.

Kubernetes stops a pod with SIGTERM, a terminal with SIGINT (Ctrl-C). Python's default SIGTERM ends the process at
once, which would leave private temporary folders behind. :func:`install` makes both signals raise
:class:`Interrupted` in the main thread (a ``KeyboardInterrupt``, so ``except Exception`` never swallows it); the
command-line entry points map it to exit status ``128 + signal`` (130 for SIGINT, 143 for SIGTERM) and one line.
A second signal while the first one's cleanup runs is ignored, so the cleanup is not cut short.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["Interrupted", "install", "restore", "exit_code"]

_state = {"signum": None}


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when SIGINT or SIGTERM arrives (after :func:`install`)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)


def _handler(signum, frame) -> None:
    if _state["signum"] is not None:
        return  # already interrupted: let the cleanup finish
    _state["signum"] = signum
    raise Interrupted(signum)


def install() -> dict | None:
    """Route SIGINT and SIGTERM to :class:`Interrupted`. Only possible in the main thread; returns the previous
    handlers (for :func:`restore`), or None when not installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _state["signum"] = None
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        if old is not signal.SIG_IGN:
            previous[sig] = old
            signal.signal(sig, _handler)
    return previous


def restore(previous: dict | None) -> None:
    """Put back the handlers :func:`install` replaced (a command called in-process leaves its caller as it was)."""
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)


def exit_code(exc: BaseException) -> int:
    """Exit status for an interruption: 128 + the signal (SIGINT when it came as a plain ``KeyboardInterrupt``)."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT))
