"""Output ownership (:mod:`editinfinity.outputs`) for the outputs that are not result folders: a single file (a batch
plan, an evaluation's or benchmark's JSON report) and a resumable training folder (``editinfinity train``,
``train-vae``, ``train-toy`` ``--out`` / ``--work``).

* A file ``--out`` (:func:`claim_file`): checked before any work; an existing file needs ``--overwrite`` and is
  replaced only when ``is_ours`` recognises it (a folder, a link or someone else's file never); one writer at a time
  (the same lock file as a result folder); the new file is written beside the target and put in place at the end
  with one step that, without ``--overwrite``, never replaces a file that appeared meanwhile. An input of the run
  is never the target, with or without ``--overwrite``.
* A JSON report (:func:`claim_report`): a file output whose ``is_ours`` is "a JSON object holding these keys"; the
  run may rewrite it after every section it measures (each rewrite one atomic ``rename``), so a long run cut short
  keeps what it measured.
* A training folder (:func:`check_training_folder`): resumed in place by design, so it is not claimed; a non-empty
  folder that holds nothing a run of ours writes is refused, and ``--overwrite`` removes only a folder of ours
  (never the root, the home folder, the current folder or one holding it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import OutputError
from .outputs import _fs_error, _lock_target, _protected, _remove_empty, check_output, remove_stale
from .storage.base import LEFTOVER, private_path

__all__ = ["claim_file", "check_file", "claim_report", "report_with_keys", "check_training_folder"]


def _file_problem(target: Path, overwrite: bool, is_ours: Callable[[Path], bool], flag: str,
                  inputs: Iterable = ()) -> str | None:
    for inp in inputs:
        if inp is not None and os.path.abspath(os.path.expanduser(str(inp))) == str(target):
            return f"{flag} {target} is an input of this run ({inp}); choose another {flag}"
    if not os.path.lexists(target):
        return None
    if target.is_symlink() or not target.is_file():
        return f"{flag} {target} is {'a symbolic link' if target.is_symlink() else 'a folder'}; give a file name"
    if not overwrite:
        return f"{flag} {target} already exists; pass --overwrite to replace it, or choose another {flag}"
    if not is_ours(target):
        return (f"{flag} {target} is not a file this command wrote, so --overwrite will not replace it; choose "
                f"another {flag}")
    return None


def check_file(out, *, overwrite: bool, is_ours: Callable[[Path], bool], flag: str = "--out",
               inputs: Iterable = ()) -> Path:
    """Refuse a file target this run may not write (changes nothing); returns it as an absolute path."""
    target = Path(os.path.abspath(os.path.expanduser(str(out))))
    problem = _file_problem(target, overwrite, is_ours, flag, inputs)
    if problem:
        raise OutputError(problem)
    if not os.path.lexists(target):
        check_output(target, flag=flag)  # the folder it goes in: a file in the way, read-only, unwritable
    return target


def _put(tmp: Path, target: Path, overwrite: bool, is_ours: Callable[[Path], bool], flag: str) -> None:
    """Put the finished ``tmp`` at ``target``: with ``overwrite`` replacing only a file ``is_ours`` recognises (checked
    again now), without it never replacing anything (a hard link fails on an existing name). ``tmp`` is gone after."""
    if overwrite and os.path.lexists(target):
        problem = _file_problem(target, overwrite, is_ours, flag)
        if problem:
            raise OutputError(problem)
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails when something appeared at the target meanwhile
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise OutputError(f"{flag} {target} appeared while this run was working; nothing there was "
                              "touched") from None
        raise _fs_error(exc, "write", target) from None
    os.unlink(tmp)


@contextlib.contextmanager
def _claimed(out, overwrite: bool, is_ours: Callable[[Path], bool], flag: str, inputs: Iterable) -> Iterator[tuple]:
    """The checks, the lock and the private name shared by :func:`claim_file` and :func:`claim_report`: yields
    ``(target, tmp, done)``; the block calls ``done()`` once the target holds this run's file."""
    inputs = list(inputs)
    target = check_file(out, overwrite=overwrite, is_ours=is_ours, flag=flag, inputs=inputs)
    lock, made = _lock_target(target, flag)
    tmp = private_path(target)
    published = []
    try:
        remove_stale(target.parent, target.name)  # a killed run's private file of this target
        check_file(target, overwrite=overwrite, is_ours=is_ours, flag=flag, inputs=inputs)  # again, under the lock
        try:
            yield target, tmp, lambda: published.append(True)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    finally:
        lock.release()
        if not published:
            _remove_empty(made)


@contextlib.contextmanager
def claim_file(out, *, overwrite: bool = False, is_ours: Callable[[Path], bool], flag: str = "--out",
               inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a private path beside the local file ``out`` for the command to write; put it at ``out`` when the block
    succeeds (see the module docstring). Raises :class:`OutputError` / ``StorageError`` before the block runs."""
    with _claimed(out, overwrite, is_ours, flag, inputs) as (target, tmp, done):
        yield tmp
        _put(tmp, target, overwrite, is_ours, flag)
        done()


def report_with_keys(*keys: str) -> Callable[[Path], bool]:
    """``is_ours`` for a JSON report: the file holds a JSON object with every one of ``keys``."""

    def is_ours(path: Path) -> bool:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    return is_ours


@contextlib.contextmanager
def claim_report(out, *, keys: Iterable[str], overwrite: bool = False, flag: str = "--out", inputs: Iterable = (),
                 indent: int = 2) -> Iterator[Callable[[dict], None]]:
    """Claim the JSON report file ``out`` (as :func:`claim_file`; ``--overwrite`` replaces only a JSON object holding
    every one of ``keys``) and yield ``write(report)``. Each call puts the report at ``out`` atomically; the first
    may only replace an earlier report of ours, later ones replace this run's previous write. Nothing is written
    when the block ends before its first call."""
    is_ours = report_with_keys(*keys)
    with _claimed(out, overwrite, is_ours, flag, inputs) as (target, tmp, done):
        state = {"published": False}

        def write(report: dict) -> None:
            tmp.write_text(json.dumps(report, indent=indent) + "\n")
            if state["published"]:
                os.replace(tmp, target)  # this run's own earlier write, under this run's lock
                return
            _put(tmp, target, overwrite, is_ours, flag)
            state["published"] = True
            done()

        yield write


def check_training_folder(folder, *, flag: str, ours: Iterable[str], overwrite: bool = False,
                          remove: bool = False, inputs: Iterable = ()) -> Path:
    """Refuse a non-empty ``folder`` that holds none of the names ``ours`` (what a training run of ours writes at
    its top level); with ``overwrite``, also refuse a folder holding anything else or a protected place, and with
    ``remove`` remove it. Returns the absolute path."""
    path = Path(os.path.abspath(os.path.expanduser(str(folder))))
    if not os.path.lexists(path):
        check_output(path, flag=flag)  # where it goes: a file in the way, read-only, unwritable
        return path
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"{flag} {path} is {'a symbolic link' if path.is_symlink() else 'a file'}; give a folder")
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return path
    known = set(ours)
    # the private names a run of ours writes beside those (train.common.replace_dir / save_dir, storage.base.private_path)
    known |= {e for e in entries if (m := LEFTOVER.match(e)) and m["name"] in known}
    if not entries & known:
        raise OutputError(f"{flag} {path} is not empty and holds no training run of ours ({', '.join(sorted(known))}"
                          f"); choose a new folder")
    if overwrite:
        why = _protected(path, [i for i in inputs if i])
        foreign = sorted(entries - known)
        if why or foreign:
            why = why or (f"holds {', '.join(foreign[:3])}{' and more' if len(foreign) > 3 else ''}, which no "
                          "training run of ours writes")
            raise OutputError(f"{flag} {path} {why}; --overwrite never removes it: move those out or choose a new "
                              "folder")
        if remove:
            shutil.rmtree(path)
    return path
