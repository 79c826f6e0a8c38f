"""editinfinity: text-guided image editing that keeps the background (EditInfinity on Infinity)."""

__version__ = "0.1.0"


def _pod_signals() -> None:
    # A pipeline component imports this package first: there SIGTERM (how Kubernetes stops a pod) must run the
    # cleanups like Ctrl-C does (see editinfinity.interrupts). Nothing happens in any other process.
    from . import interrupts

    if interrupts.in_pod():
        interrupts.install_for_pod()


_pod_signals()
