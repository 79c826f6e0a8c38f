"""Output ownership: a command writes its ``--out`` folder all at once, and never removes what is not its own.

Every command that writes an ``--out`` folder does it through :func:`claim_output`:

* **Before any work** (before models load) the target is checked: an existing non-empty folder needs
  ``--overwrite``, and ``--overwrite`` replaces only a folder that is recognisably an earlier result of ours (its
  ownership record ``.editinfinity-output.json`` lists every file in it, or, for results of older versions, it holds
  our ``summary.json`` / ``stage.json`` / ``model_index.json`` / ``_MANIFEST.json``). The file-system root, the home
  folder, the current folder (or one holding it), an input's folder and a folder holding an input are never taken
  as ``--out``. A file in the way, a read-only or unwritable place fails here too (exit 3).
* **One writer per target**: a lock file ``.NAME.editinfinity-lock`` beside the target (``flock``: the kernel frees
  it when the process dies, even by SIGKILL) is held for the whole run; a second run into the same ``--out`` fails
  at once naming the first one's pid and host.
* **Private folder**: the run writes into ``.NAME.editinfinity-tmp-HOST-PID-XXXXXX`` beside the target (same file
  system, so publishing is one ``rename``), with a marker holding pid, host and process start time.
* **Publish**: one atomic rename. Without ``--overwrite`` the rename can only replace an empty folder, so if
  something appeared at ``--out`` meanwhile nothing there is touched: the run fails and keeps its result under a
  printed name. With ``--overwrite`` the earlier result is moved aside, checked again (a file added to it in the
  meantime makes the run keep its result aside instead), the new one renamed in, and the old one removed.
* **Interrupted runs**: on an exception, SIGINT or SIGTERM (see :mod:`editinfinity.interrupts`) the private folder
  is removed. After a SIGKILL its name and marker say which process made it; the next run into the same ``--out``
  removes such folders when that process is gone, and ``editinfinity clean`` lists or removes them anywhere.

Remote targets (``gs://``, ``s3://``) are checked before any work as well (credentials, bucket, write access, an
existing result needs ``--overwrite``), claimed by one run at a time with a claim object made by a conditional
create, and published with :func:`editinfinity.storage.publish_dir` (:mod:`editinfinity.remote_outputs`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError, StorageError
from .leftovers import RUN_MARKER, Leftover, _json, _remove_leftover, remove_stale, stale_folders
from .storage.base import _NAME_MAX, host_name, private_path, process_start_time

log = logging.getLogger(__name__)

__all__ = ["RECORD", "claim_output", "check_output", "precheck_output", "is_ours", "stale_folders", "clean",
           "remove_stale", "Leftover", "usual_modes"]

#: Ownership record written into every published folder: the files that make up the result.
RECORD = ".editinfinity-output.json"
RECORD_FORMAT = "editinfinity-output/1"
_TMP, _OLD, _LOCK = "editinfinity-tmp", "editinfinity-old", "editinfinity-lock"
_host = host_name


_start_time = process_start_time
_hidden = private_path


# ---------------------------------------------------------------------------------------------------------------
# what a folder is


def _files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            out.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(out)


def _legacy_marker(folder: Path) -> str | None:
    """The file that shows a folder without an ownership record is an editinfinity result of an older version."""
    checks = (("summary.json", lambda d: "run_id" in d and "spec" in d),
              ("stage.json", lambda d: str(d.get("format", "")).startswith("editinfinity-stage/")),
              ("model_index.json", lambda d: "editinfinity_preset" in d),
              ("_MANIFEST.json", lambda d: str(d.get("format", "")).startswith("editinfinity-manifest/")))
    for name, ok in checks:
        data = _json(folder / name)
        if data is not None and ok(data):
            return name
    return None


def is_ours(folder: Path) -> tuple[bool, str]:
    """Whether ``--overwrite`` may replace ``folder``, and if not, why (a phrase that follows the folder's name)."""
    folder = Path(folder)
    if folder.is_symlink():
        return False, "is a symbolic link (--overwrite never replaces links)"
    if not folder.is_dir():
        return False, "is a file, not a result folder"
    if not any(folder.iterdir()):
        return True, ""
    record = _json(folder / RECORD)
    if record is not None and record.get("format") == RECORD_FORMAT:
        listed = set(record.get("files", []))
        extra = [f for f in _files(folder) if f != RECORD and f not in listed]
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            return False, (f"holds files that are not part of the earlier result ({', '.join(extra[:3])}{more}); "
                           "move them out first")
        return True, ""
    if _legacy_marker(folder):
        return True, ""
    return False, ("is not an earlier editinfinity result (no summary.json or stage.json of ours in it), so "
                   "--overwrite will not replace it")


def _write_record(folder: Path, what: str) -> None:
    (folder / RUN_MARKER).unlink(missing_ok=True)
    record = {"format": RECORD_FORMAT, "what": what, "files": [f for f in _files(folder) if f != RECORD],
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    usual_modes(folder)


def usual_modes(folder: Path) -> None:
    """Give every file and folder of a result the modes the user's umask asks for (``0o666 & ~umask``, folders
    ``0o777 & ~umask``): some writers (safetensors, temporary files) create their files 0600."""
    from .storage.base import current_umask

    umask = current_umask()
    for dirpath, _dirs, files in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~umask)


def _protected(out: Path, inputs: Iterable) -> str | None:
    """Why ``out`` may never be an output folder (None when it may)."""
    try:
        r = out.resolve()
    except (OSError, RuntimeError):
        return None
    if r == Path(r.anchor):
        return "is the root of the file system"
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if r == cwd:
        return "is the current folder"
    if r in cwd.parents:
        return "holds the current folder"
    if r == home or r in home.parents:
        return "is your home folder" if r == home else "holds your home folder"
    for inp in inputs:
        if inp is None or not isinstance(inp, (str, os.PathLike)) or "://" in str(inp):
            continue
        p = Path(inp).resolve()
        if r == p:
            return f"is an input ({inp})"
        if r == p.parent:
            return f"is the folder of the input {inp}"
        if r in p.parents:
            return f"holds the input {inp}"
    return None


def _fs_error(exc: OSError, what: str, where: Path) -> StorageError:
    reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "the operation is not permitted (an immutable folder?)",
              errno.ENOTDIR: "a file is in the way", errno.ENOSPC: "the disk is full",
              errno.EDQUOT: "the disk quota is exceeded",
              errno.ENAMETOOLONG: "the name is too long"}.get(exc.errno, exc.strerror or str(exc))
    err = StorageError(f"cannot {what} {where}: {reason}; choose a writable --out")
    err.kind = "local"
    return err


def _first_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output(out, *, overwrite: bool = False, inputs: Iterable = (), flag: str = "--out") -> None:
    """Refuse a local ``out`` that this run may not write (see the module docstring); changes nothing."""
    out = Path(os.path.abspath(os.path.expanduser(str(out))))
    why = _protected(out, inputs) if os.path.lexists(out) else None
    if why:
        raise OutputError(f"{flag} {out} {why}; choose a new folder for the result")
    if os.path.lexists(out):
        if out.is_symlink() or not out.is_dir():
            kind = "a symbolic link" if out.is_symlink() else "an existing file"
            raise OutputError(f"{flag} {out} is {kind}; give the name of a folder to create"
                              + (" (--overwrite replaces only an earlier result folder, never a file)"
                                 if overwrite else ""))
        if any(out.iterdir()):
            if not overwrite:
                raise OutputError(f"{flag} {out} already exists and is not empty; pass --overwrite to replace an "
                                  f"earlier result, or choose another {flag}")
            ok, reason = is_ours(out)
            if not ok:
                raise OutputError(f"{flag} {out} {reason}; choose another {flag}")
        return
    base = _first_existing(out.parent)
    if not base.is_dir():
        raise StorageError(f"cannot create {flag} {out}: {base} is a file, not a folder; choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        ro = _read_only(base)
        raise StorageError(f"cannot create {flag} {out}: {base} is "
                           f"{'on a read-only file system' if ro else 'not writable (permissions, or an immutable folder)'}; "
                           f"choose a writable {flag}")


def precheck_output(out, *, overwrite: bool = False, inputs: Iterable = (), flag: str = "--out") -> None:
    """:func:`check_output` for ``out`` given as a path or URI, cheap enough to run before a command's heavy
    imports (torch, diffusers: seconds): a malformed URI or a local target this run may not write fails at once.
    Remote targets are checked by :func:`claim_output` (before any model loads); it checks local ones again."""
    from .storage.uri import InvalidURIError, file_uri_path, has_scheme, parse_uri

    try:
        u = parse_uri(str(out))
    except InvalidURIError as exc:
        raise InvalidURIError(f"{flag}: {exc}") from None
    if u.is_remote:
        return
    local = []
    for inp in inputs:
        try:
            inp = file_uri_path(inp)
        except InvalidURIError:
            continue  # refused, naming its flag, where the input is read
        if isinstance(inp, (str, os.PathLike)) and not has_scheme(inp):
            local.append(inp)
    check_output(u.key, overwrite=overwrite, inputs=local, flag=flag)


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# the lock


class _Lock:
    """An exclusive ``flock`` on ``.NAME.editinfinity-lock`` beside the target, removed on release."""

    def __init__(self, out: Path, flag: str) -> None:
        self.path = out.parent / f".{out.name[:_NAME_MAX]}.{_LOCK}"
        self.out, self.flag, self.fd = out, flag, None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _fs_error(exc, "write beside", self.out) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputError(f"another editinfinity run ({holder}) is writing {self.flag} {self.out}; wait "
                                  f"for it to finish or choose another {self.flag}") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and lock: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {_host()}".encode(), 0)
            self.fd = fd
            return

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


# ---------------------------------------------------------------------------------------------------------------
# leftovers of killed runs


def _stale_locks(folder: Path, *, remove: bool) -> list[Path]:
    """Lock files in ``folder`` that no process holds (their run was killed); removed when ``remove``."""
    found = []
    for p in sorted(Path(folder).glob(f".*.{_LOCK}")):
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            found.append(p)
            if remove:
                with contextlib.suppress(OSError):
                    os.unlink(p)
        finally:
            os.close(fd)
    return found


def clean(folders: Iterable, *, dry_run: bool = False) -> list[str]:
    """Remove (or only list, ``dry_run``) leftovers of killed runs in ``folders``; one line per leftover."""
    lines = []
    for folder in folders:
        for p in _stale_locks(Path(folder), remove=not dry_run):
            lines.append(f"{'would remove' if dry_run else 'removed'} {p} (a lock no run holds)")
        for item in stale_folders(folder):
            if item.state != "stale":
                note = ("its process is still running" if item.state == "running"
                        else f"made on host {item.host}; run `editinfinity clean` there, or remove it by hand")
                lines.append(f"kept {item.path}: {note}")
            elif dry_run:
                lines.append(f"would remove {item.path} (left by pid {item.pid}, which is gone)")
            else:
                lines.append(_remove_leftover(item))
    return lines


# ---------------------------------------------------------------------------------------------------------------
# claim and publish


@contextlib.contextmanager
def claim_output(out, *, overwrite: bool = False, inputs: Iterable = (), flag: str = "--out",
                 what: str = "result") -> Iterator[Path]:
    """Yield a private local folder for the command to fill; publish it at ``out`` when the block succeeds.

    ``out`` is a local path, ``file://`` URI, or a ``gs://`` / ``s3://`` URI; ``inputs`` are the local paths the
    run reads (never replaced). Raises :class:`OutputError` (exit 2) for a target this run may not write and
    :class:`StorageError` (exit 3) for one it cannot write, both before the block runs.
    """
    from . import storage

    inputs = list(inputs)
    try:
        u = storage.parse_uri(str(out))
    except storage.InvalidURIError as exc:
        raise storage.InvalidURIError(f"{flag}: {exc}") from None
    if u.is_remote:
        with _claim_remote(u, overwrite=overwrite, flag=flag, what=what) as tmp:
            yield tmp
        return
    target = Path(u.key)
    marker = _json(target / RUN_MARKER) if target.is_dir() else None
    if marker and marker.get("pid") == os.getpid() and marker.get("host") == _host():
        yield target  # already claimed by this process (a command claims before it calls a library function)
        return
    check_output(target, overwrite=overwrite, inputs=inputs, flag=flag)
    lock, made = _lock_target(target, flag)
    published = False
    try:
        remove_stale(target.parent, target.name)
        check_output(target, overwrite=overwrite, inputs=inputs, flag=flag)  # again, under the lock
        tmp = _hidden(target, _TMP)
        try:
            os.mkdir(tmp)
            (tmp / RUN_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": _host(),
                                                      "start": _start_time(os.getpid()), "target": str(target)}))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _fs_error(exc, "write beside", target) from None
        try:
            yield tmp
            _write_record(tmp, what)
            _publish(tmp, target, overwrite=overwrite, inputs=inputs, flag=flag)
            published = True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
        if not published:
            _remove_empty(made)
    log.info("wrote %s", target)


def _lock_target(target: Path, flag: str) -> tuple[_Lock, list[Path]]:
    """Make ``target``'s missing parent folders and take its lock; the lock and the folders made (removed again,
    if empty, when the lock cannot be taken)."""
    made = _make_parents(target)
    lock = _Lock(target, flag)
    try:
        lock.acquire()
    except BaseException:
        _remove_empty(made)
        raise
    return lock, made


def _make_parents(target: Path) -> list[Path]:
    """Create the missing folders above ``target``; returns them (deepest first) so a failed run can remove them."""
    missing = []
    p = target.parent
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(missing)
        raise _fs_error(exc, "create the folder for", target) from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first; a folder someone else filled meanwhile stays
        try:
            p.rmdir()
        except OSError:
            break


def _keep_aside(tmp: Path, target: Path) -> Path:
    kept = target.parent / f"{target.name[:_NAME_MAX]}.editinfinity-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.rename(tmp, kept)
    return kept


def _publish(tmp: Path, target: Path, *, overwrite: bool, inputs: list, flag: str) -> None:
    exists = os.path.lexists(target)
    if overwrite and exists and not (target.is_dir() and not target.is_symlink() and not any(target.iterdir())):
        ok, reason = is_ours(target)
        why = _protected(target, inputs)
        if not ok or why:
            kept = _keep_aside(tmp, target)
            raise OutputError(f"{flag} {target} {why or reason}; nothing there was touched. This run's result is "
                              f"kept at {kept}")
        old = _hidden(target, _OLD)
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, target)  # replaces at most an empty folder
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.EBUSY):
            kept = _keep_aside(tmp, target)
            raise OutputError(f"{flag} {target} appeared while this run was working (another run or program "
                              f"wrote it); nothing there was touched. This run's result is kept at {kept}") from None
        raise _fs_error(exc, "publish", target) from None


@contextlib.contextmanager
def _claim_remote(u, *, overwrite: bool, flag: str, what: str) -> Iterator[Path]:
    """Check ``u``, claim it (:mod:`editinfinity.remote_outputs`), yield a local private folder, and publish it at
    ``u`` when the block succeeds; the claim is released in every case."""
    from . import storage
    from .remote_outputs import check_remote_output, claim_remote, release_remote
    from .scratch import scratch_dir

    ours = {RECORD, "summary.json", "stage.json"}
    check_remote_output(u, overwrite=overwrite, flag=flag, ours=ours)
    token = claim_remote(u, flag=flag)
    try:
        check_remote_output(u, overwrite=overwrite, flag=flag, ours=ours)  # again, as the claim's holder
        with scratch_dir("editinfinity-out") as tmp:
            local = Path(tmp) / "out"
            local.mkdir()
            yield local
            _write_record(local, what)
            storage.publish_dir(local, u)
    finally:
        release_remote(u, token)
