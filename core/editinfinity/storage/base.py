"""What every backend shares: object metadata, error kinds and fixes, atomic local writes, the retrying ``Backend`` base class."""


from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from editinfinity.errors import StorageError

from .settings import MiB, StorageSettings
from .uri import StorageURI

log = logging.getLogger(__name__)


T = TypeVar("T")

MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = "editinfinity-manifest/1"
SHA256_METADATA_KEY = "sha256"

# Error kinds that are worth another attempt (bounded by StorageSettings).
_RETRYABLE = frozenset({"transient", "unreachable", "integrity"})

# --------------------------------------------------------------------------------------------------------------
# Object metadata and errors
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object. ``rel`` is the path relative to the listed directory (listings only)."""

    uri: str
    size: int
    etag: str | None = None
    generation: str | None = None  # GCS generation, S3 VersionId, local mtime_ns
    sha256: str | None = None  # recorded in object metadata by this module's uploads
    md5: str | None = None  # hex, when the store reports it cheaply
    crc32c: str | None = None  # base64, GCS
    rel: str = ""

    @property
    def version_token(self) -> str:
        """A string that changes whenever the object's content may have changed (cache key)."""
        return f"{self.generation or ''}|{self.etag or ''}|{self.size}|{self.sha256 or ''}"


class _IntegrityMismatch(Exception):
    """Downloaded bytes do not match the expected size or sha256 (retried, then reported as kind 'integrity')."""


class ObjectExists(Exception):
    """``create_bytes`` found the object already there (a conditional create refused; never retried)."""


class _Incomplete(Exception):
    """A published directory is missing its manifest or objects (never retried)."""


def _storage_error(
    kind: str, op: str, u: StorageURI | None, what: str, fix: str, endpoint: str | None = None, attempts: int = 1
) -> StorageError:
    if u is None:
        where = ""
        scheme = bucket = key = ""
    elif u.is_remote:
        scheme, bucket, key = u.scheme, u.bucket, u.key
        where = f" [scheme={scheme}, bucket={bucket!r}, key={key!r}" + (f", endpoint={endpoint}" if endpoint else "")
        where += f", attempts={attempts}]" if attempts > 1 else "]"
    else:
        scheme, bucket, key = "file", "", u.key
        where = f" [scheme=file, path={key!r}]"
    err = StorageError(f"{op} {u if u is not None else ''}: {what}{where}. Fix: {fix}")
    err.kind = kind  # type: ignore[attr-defined]
    err.uri = str(u) if u is not None else ""  # type: ignore[attr-defined]
    err.scheme, err.bucket, err.key = scheme, bucket, key  # type: ignore[attr-defined]
    err.attempts = attempts  # type: ignore[attr-defined]
    return err


def _root_cause(exc: BaseException) -> BaseException:
    """Unwrap boto3's wrappers (S3UploadFailedError, RetriesExceededError) to the error the store returned."""
    seen = 0
    while seen < 5:
        seen += 1
        name = type(exc).__name__
        if name == "RetriesExceededError" and getattr(exc, "last_exception", None) is not None:
            exc = exc.last_exception  # type: ignore[attr-defined]
        elif name == "S3UploadFailedError" and (exc.__cause__ or exc.__context__) is not None:
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        else:
            break
    return exc


# --------------------------------------------------------------------------------------------------------------
# Local file helpers (atomic writes)
# --------------------------------------------------------------------------------------------------------------


#: What a private name made by :func:`private_path` says: the target's name, the kind (``editinfinity-tmp``: being
#: written; ``editinfinity-old``: an earlier version moved aside), the host and pid of the process that made it.
#: :func:`editinfinity.outputs.stale_folders` reads it back to remove what a killed run left.
LEFTOVER = re.compile(r"^\.(?P<name>.*)\.(?P<kind>editinfinity-(?:tmp|old))-(?P<host>[A-Za-z0-9.-]+)-(?P<pid>\d+)"
                      r"-(?P<token>[0-9a-f]{6})$")
_NAME_MAX = 100  # characters of the target's name used in a private name (file names are at most 255 bytes)


def host_name() -> str:
    """This machine's name as it appears in private names (letters, digits, '.', '-')."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"


def private_path(dest: Path, kind: str = "editinfinity-tmp") -> Path:
    """A new hidden name beside ``dest`` recording who made it (:data:`LEFTOVER`)."""
    return dest.parent / f".{dest.name[:_NAME_MAX]}.{kind}-{host_name()}-{os.getpid()}-{secrets.token_hex(3)}"


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs (and, given its ``start`` time, is still the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is not None:
        now = process_start_time(pid)
        if now is not None and now != start:
            return False
    return True


def current_umask() -> int:
    """The process's umask, read now (the modes our files get: ``0o666 & ~umask``, folders ``0o777 & ~umask``).

    ``os.umask()`` is a process-wide set-and-restore (racy under threads); Linux exposes it read-only instead."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022



def sha256_file(path: str | os.PathLike, bufsize: int = 4 * MiB) -> str:
    """Hex sha256 of a local file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _atomic_write(dest: Path, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` for a temp file next to ``dest``, then ``os.replace`` it onto ``dest``.

    On any failure the temp file is removed and ``dest`` keeps its previous content (or stays absent).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_path(dest)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        result = write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, dest)
        return result
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _make_temp_dir_near(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_path(dest)
    tmp.mkdir(mode=0o700)
    return tmp


def _install_dir(tmp: Path, dest: Path, *, replace_existing: bool = True) -> bool:
    """Rename the finished ``tmp`` directory onto ``dest``.

    An existing ``dest`` directory is moved aside first and deleted after the rename (``replace_existing``), or
    kept and ``tmp`` discarded (``replace_existing=False``, used by the cache where another process may have won
    the race). Returns True when ``tmp`` was installed.
    """
    os.chmod(tmp, 0o777 & ~current_umask())
    if not replace_existing:
        try:
            os.rename(tmp, dest)
            return True
        except OSError:
            if dest.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
    if dest.is_symlink() or dest.is_file():
        raise StorageError(f"cannot write directory {dest}: a file is in the way. Fix: remove it or pick another path")
    old: Path | None = None
    if dest.exists():
        old = private_path(dest, "editinfinity-old")
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def _walk_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` as (relative posix path, absolute path), sorted; the manifest is skipped."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in filenames:
            p = Path(dirpath, fname)
            rel = p.relative_to(root).as_posix()
            if rel == MANIFEST_NAME or not p.is_file():
                continue
            out.append((rel, p))
    out.sort()
    return out


def _safe_rel(rel: str) -> str:
    """Reject relative paths that would escape the target directory."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise _Incomplete(f"unsafe relative path {rel!r} in listing or manifest")
    return rel


# --------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------


class Backend:
    """One store. Raw methods raise the client library's exceptions; ``run`` adds retries and error mapping."""

    scheme = ""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings

    # -- raw operations (overridden) -------------------------------------------------------------------------
    def stat_object(self, u: StorageURI) -> ObjectInfo:
        raise NotImplementedError

    def download_object(self, u: StorageURI, dest: Path, info: ObjectInfo | None = None) -> None:
        raise NotImplementedError

    def upload_file(self, src: Path, u: StorageURI, size: int, metadata: dict[str, str]) -> None:
        raise NotImplementedError

    def get_bytes(self, u: StorageURI) -> bytes:
        raise NotImplementedError

    def put_bytes(self, u: StorageURI, data: bytes, metadata: dict[str, str]) -> None:
        raise NotImplementedError

    def create_bytes(self, u: StorageURI, data: bytes) -> None:
        """Create the object only if it does not exist, in one request the store decides (S3 ``If-None-Match: *``,
        GCS ``ifGenerationMatch=0``, a local hard link); raises :class:`ObjectExists` when it does."""
        raise NotImplementedError

    def list_objects(self, u: StorageURI, limit: int | None = None) -> list[ObjectInfo]:
        """Objects under ``u`` seen as a directory (recursive), at most ``limit`` of them."""
        raise NotImplementedError

    def delete_object(self, u: StorageURI) -> None:
        raise NotImplementedError

    def bucket_exists(self, bucket: str) -> bool:
        return True

    # -- error mapping (overridden) --------------------------------------------------------------------------
    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        """(kind, detail) for errors this backend understands; None lets the exception propagate unchanged.

        This default is where the object stores' own mappings end: the standard library's network errors are
        transient, any other ``OSError`` is ``other``."""
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return "transient", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError):
            return "other", f"{type(exc).__name__}: {exc}"
        return None

    def endpoint(self) -> str | None:
        return None

    def fix(self, kind: str, u: StorageURI, op: str) -> str:
        return _COMMON_FIXES.get(kind, "see the error detail above")

    def refine(self, kind: str, u: StorageURI) -> tuple[str, str]:
        """Turn an ambiguous 404/403 into no_bucket / credentials with one cheap extra request.

        Returns the (possibly new) kind and a note for the message ("" when nothing was learned)."""
        if kind == "not_found" and u.bucket:
            try:
                if not self.bucket_exists(u.bucket):
                    return "no_bucket", ""
            except Exception:  # best effort: keep the original diagnosis
                pass
        return kind, ""

    # -- retry loop ------------------------------------------------------------------------------------------
    def run(self, op: str, u: StorageURI, fn: Callable[[], T]) -> T:
        """Call ``fn`` with bounded retries for transient errors; map failures to ``StorageError``."""
        s = self.settings
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except StorageError:
                raise
            except _Incomplete as exc:
                raise _storage_error("incomplete", op, u, str(exc), _INCOMPLETE_FIX, self.endpoint()) from exc
            except Exception as exc:
                if isinstance(exc, _IntegrityMismatch):
                    kind, detail = "integrity", str(exc)
                else:
                    got = self.classify(_root_cause(exc))
                    if got is None:
                        raise
                    kind, detail = got
                limit = {
                    "unreachable": s.max_unreachable_attempts,
                    "integrity": s.max_integrity_attempts,
                }.get(kind, s.max_attempts)
                if kind in _RETRYABLE and attempt < limit:
                    delay = min(s.backoff_max, s.backoff_initial * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                    if time.monotonic() - start + delay < s.retry_deadline:
                        log.warning(
                            "%s %s: %s (%s); retrying in %.2f s (attempt %d/%d)", op, u, kind, detail, delay,
                            attempt + 1, limit,
                        )
                        time.sleep(delay)
                        continue
                if kind in ("not_found", "forbidden"):
                    kind, note = self.refine(kind, u)
                    detail += f"; {note}" if note else ""
                what = f"{_KIND_SUMMARY.get(kind, kind)} ({detail})"
                if kind in _RETRYABLE and attempt > 1:
                    what += f"; gave up after {attempt} attempts in {time.monotonic() - start:.1f} s"
                raise _storage_error(kind, op, u, what, self.fix(kind, u, op), self.endpoint(), attempt) from exc


_KIND_SUMMARY = {
    "not_found": "object not found",
    "no_bucket": "bucket does not exist",
    "credentials": "credentials missing or rejected",
    "forbidden": "permission denied",
    "unreachable": "endpoint unreachable",
    "tls": "TLS/SSL failure",
    "transient": "transient store error",
    "integrity": "checksum or size mismatch",
    "invalid": "invalid request",
    "other": "storage error",
}

_INCOMPLETE_FIX = (
    f"the directory has no valid {MANIFEST_NAME}, so it was not published completely (an interrupted upload, or "
    "written by another tool): re-run the step that produces it, or download with verify=False to accept an "
    "unpublished prefix as is"
)

_COMMON_FIXES = {
    "not_found": "check the key/path and that the producing step ran and wrote there; for a directory use "
    "download_dir/localize",
    "transient": "the store kept failing; retry later, or raise EDITINFINITY_STORAGE_MAX_ATTEMPTS / "
    "EDITINFINITY_STORAGE_RETRY_DEADLINE if it is overloaded",
    "integrity": "the bytes received did not match the recorded size/sha256: the object changed during the "
    "download or is corrupt; re-run the producing step",
    "invalid": "check the URI (bucket names: 3-63 lowercase letters, digits, '-', '.') and the storage settings",
    "other": "see the error detail",
}
