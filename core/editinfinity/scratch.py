"""Scratch folders that a killed process does not leave behind for ever.

``tempfile.TemporaryDirectory`` is removed on return, on an exception and on SIGINT / SIGTERM (which
:mod:`editinfinity.interrupts` turns into an exception), but a SIGKILL (the kernel's out-of-memory killer, ``kill
-9``, a pod's grace period running out) leaves it in the temporary folder, and ours can be large (decoded images,
copies of weights). :func:`scratch_dir` makes the folder under the same private name that every other temporary of
ours carries, ``.PREFIX.editinfinity-tmp-HOST-PID-XXXXXX`` (:func:`editinfinity.storage.base.private_path`), and on
creation removes the folders with the same prefix that dead processes of this host left there
(:func:`editinfinity.leftovers.remove_stale`). A live process's folder, another host's (a shared temporary folder) and
names we did not make are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["scratch_dir", "make_scratch", "remove_stale_scratch"]


def _name(prefix: str) -> str:
    return prefix.strip(".-_") or "editinfinity"


def remove_stale_scratch(prefix: str, dir=None) -> None:
    """Remove the scratch folders named for ``prefix`` in ``dir`` (the system's temporary folder by default) whose
    process on this host is gone."""
    from .leftovers import remove_stale  # here: storage imports this module

    remove_stale(Path(dir or tempfile.gettempdir()), _name(prefix))


def make_scratch(prefix: str, dir=None) -> Path:
    """Make a new private scratch folder (mode 0700) named for ``prefix`` in ``dir`` after removing stale ones; the
    caller removes it (use :func:`scratch_dir` where a ``with`` block fits)."""
    from .storage.base import private_path  # here: storage imports this module

    base = Path(dir or tempfile.gettempdir())
    remove_stale_scratch(prefix, base)
    while True:
        path = private_path(base / _name(prefix))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path


@contextlib.contextmanager
def scratch_dir(prefix: str, dir=None) -> Iterator[Path]:
    """A private scratch folder for the ``with`` block (see the module docstring), removed when it ends."""
    path = make_scratch(prefix, dir)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
