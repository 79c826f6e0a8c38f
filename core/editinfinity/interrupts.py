"""SIGINT and SIGTERM as one exception, so every ``finally``/``except BaseException`` cleanup runs.

Kubernetes stops a pod with SIGTERM, a terminal with SIGINT (Ctrl-C). Python's default SIGTERM ends the process at
once, which would leave private temporary folders behind. :func:`install` makes both signals raise
:class:`Interrupted` in the main thread (a ``KeyboardInterrupt``, so ``except Exception`` never swallows it); the
command-line entry points map it to exit status ``128 + signal`` (130 for SIGINT, 143 for SIGTERM) and one line.
A second signal while the first one's cleanup runs is ignored, so the cleanup is not cut short.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["Interrupted", "install", "restore", "exit_code", "install_for_pod", "in_pod", "run_script"]

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


#: The module a KFP v2 pod runs as ``__main__`` to execute a Python component.
KFP_EXECUTOR = "kfp.dsl.executor_main"


def in_pod() -> bool:
    """Whether this process runs a pipeline component (KFP's executor is ``__main__``, or
    ``EDITINFINITY_HANDLE_SIGNALS=1`` asks for the same handling)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == KFP_EXECUTOR or os.environ.get("EDITINFINITY_HANDLE_SIGNALS") == "1"


def install_for_pod() -> None:
    """In a component's process: SIGTERM / SIGINT run every cleanup (private output folders are removed, nothing
    half-written is published, since KFP uploads output artifacts only after a successful exit) and the process
    ends with one line and status 143 / 130 instead of a traceback."""
    if install() is None:
        return
    previous_hook = sys.excepthook

    def hook(kind, exc, tb):
        if isinstance(exc, Interrupted):
            print(f"terminated by {signal.Signals(exc.signum).name}; this step's partial outputs were removed",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(exit_code(exc))
        previous_hook(kind, exc, tb)

    sys.excepthook = hook


def run_script(main, *args) -> int:
    """Run a script's ``main(*args)`` (``python -m editinfinity.evaluation.toy_eval``, ``bench/*.py``) the way the
    ``editinfinity`` command runs its commands: SIGINT / SIGTERM run every cleanup (a claimed ``--out`` is left as
    it was) and end with status 130 / 143, bad input (an ``EditInfinityError``) is one line on stderr and its exit
    status. Returns the exit status."""
    from .errors import EditInfinityError

    previous = install()
    try:
        return main(*args) or 0
    except EditInfinityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        code = exit_code(exc)
        print(f"{'terminated (SIGTERM)' if code == 143 else 'interrupted'}; this run's temporary files were removed",
              file=sys.stderr)
        return code
    finally:
        restore(previous)
