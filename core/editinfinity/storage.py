"""Object storage by URI: local paths (and ``file://``), ``gs://bucket/key`` and ``s3://bucket/key``.

Stages pass artifacts through object storage; everything that takes a path also takes a URI. This module is the
one place that talks to the stores:

* ``parse_uri`` / ``is_remote``: what a URI names.
* ``download`` / ``upload`` (one file), ``download_dir`` / ``upload_dir`` (a tree), ``read_bytes`` / ``write_bytes``,
  ``open_uri``, ``exists``, ``stat``, ``list_uri``.
* ``publish_dir``: uploads every file, then a ``_MANIFEST.json`` object last (relative paths, sizes, sha256). A reader
  that finds the manifest sees a complete directory; ``download_dir`` verifies it and refuses a prefix without one.
  An interrupted publish never leaves a manifest (an older one is deleted before any object is overwritten).
* ``localize`` (inputs: URIs are downloaded once into a cache keyed by URI + etag/generation) and ``staged_output``
  (outputs: stage code writes a local directory that is published to the URI only on success).

Configuration comes from the environment (so KFP component subprocesses need no code): ``AWS_ENDPOINT_URL`` or
``EDITINFINITY_S3_ENDPOINT`` (MinIO, Ceph), the usual AWS credential variables, ``STORAGE_EMULATOR_HOST`` (GCS
emulator, anonymous credentials) or Google application-default credentials, ``EDITINFINITY_CACHE``; or pass a
``StorageSettings``. Transient failures (connection errors, 5xx, throttling) are retried with exponential backoff,
bounded in attempts and total time; timeouts are short so an unreachable endpoint fails within seconds. Every
failure is raised as ``editinfinity.errors.StorageError`` naming scheme, bucket, key and the likely fix; the error
also carries ``kind`` (``not_found``, ``no_bucket``, ``credentials``, ``forbidden``, ``unreachable``, ``tls``,
``transient``, ``integrity``, ``incomplete``, ``invalid``, ``other``), ``uri``, ``scheme``, ``bucket`` and ``key``.

Local writes are atomic: files go to a temp file in the same folder and are ``os.replace``-d into place;
directories are built in a temp folder next to the target and renamed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from editinfinity.errors import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
MANIFEST_NAME = "_MANIFEST.json"
MANIFEST_FORMAT = "editinfinity-manifest/1"
SHA256_METADATA_KEY = "sha256"
SCHEMES = ("file", "gs", "s3")
_SCHEME_ALIASES = {"gcs": "gs", "file": "file", "gs": "gs", "s3": "s3"}

# Error kinds that are worth another attempt (bounded by StorageSettings).
_RETRYABLE = frozenset({"transient", "unreachable", "integrity"})


# --------------------------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageURI:
    """A parsed location. ``scheme`` is ``file``, ``gs`` or ``s3``; for ``file`` the ``key`` is an absolute path
    and ``bucket`` is empty; for the object stores ``key`` is the raw object key (may be empty: the bucket root)."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.key
        return f"{self.scheme}://{self.bucket}/{self.key}"

    @property
    def is_remote(self) -> bool:
        """True for object-store URIs (``gs://``, ``s3://``)."""
        return self.scheme != "file"

    @property
    def path(self) -> Path:
        """The local path of a ``file`` URI."""
        if self.is_remote:
            raise StorageError(f"{self} is not a local path")
        return Path(self.key)

    @property
    def name(self) -> str:
        """Last path component (``""`` for a bucket root)."""
        return self.key.rstrip("/").rsplit("/", 1)[-1] if self.key.strip("/") else ""

    def dir_prefix(self) -> str:
        """The key prefix of everything 'inside' this URI seen as a directory (``""`` for a bucket root)."""
        k = self.key.rstrip("/")
        return k + "/" if k else ""

    def join(self, *parts: str) -> StorageURI:
        """This URI seen as a directory, extended by relative ``/``-separated parts."""
        rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if self.scheme == "file":
            return StorageURI("file", "", str(Path(self.key, *rel.split("/"))) if rel else self.key)
        return StorageURI(self.scheme, self.bucket, self.dir_prefix() + rel)


URILike = str | os.PathLike | StorageURI


def parse_uri(uri: URILike) -> StorageURI:
    """Parse a local path, ``file://`` URL, ``gs://bucket/key`` or ``s3://bucket/key``.

    Raises ``StorageError`` for other schemes or a missing bucket name.
    """
    if isinstance(uri, StorageURI):
        return uri
    if isinstance(uri, os.PathLike):
        return StorageURI("file", "", os.path.abspath(os.path.expanduser(os.fspath(uri))))
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"not a path or URI: {uri!r}")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", uri)
    if not m:
        return StorageURI("file", "", os.path.abspath(os.path.expanduser(uri)))
    raw_scheme, rest = m.group(1).lower(), m.group(2)
    scheme = _SCHEME_ALIASES.get(raw_scheme)
    if scheme is None:
        raise StorageError(
            f"unsupported URI scheme {raw_scheme!r} in {uri!r}: use a local path, file://, gs://bucket/key or "
            "s3://bucket/key (download other sources first)"
        )
    if scheme == "file":
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri!r}: file:// URIs must name a local path (file:///abs/path)")
        return StorageURI("file", "", os.path.abspath(urllib.parse.unquote(parsed.path)))
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name: write {scheme}://BUCKET/KEY")
    return StorageURI(scheme, bucket, key)


def is_remote(uri: URILike) -> bool:
    """True when ``uri`` names an object store (``gs://``, ``s3://``), False for local paths and ``file://``."""
    return parse_uri(uri).is_remote


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise StorageError(f"environment variable {name}={raw!r} is not a number: set it to e.g. {default}") from None


def _normalize_endpoint(url: str | None) -> str | None:
    if not url:
        return None
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


@dataclass(frozen=True)
class StorageSettings:
    """How to reach the stores and how hard to try. ``from_env()`` fills endpoints and limits from the environment.

    Timeouts are per connection attempt / per socket read. Retries cover transient errors only and stop after
    ``max_attempts`` attempts (``max_unreachable_attempts`` when the endpoint refuses connections) or when the next
    backoff would pass ``retry_deadline`` seconds since the first attempt.
    """

    s3_endpoint_url: str | None = None
    gcs_endpoint: str | None = None
    gcs_project: str | None = None
    connect_timeout: float = 3.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    max_unreachable_attempts: int = 3
    max_integrity_attempts: int = 2
    retry_deadline: float = 30.0
    backoff_initial: float = 0.25
    backoff_max: float = 4.0
    multipart_threshold: int = 8 * MiB
    multipart_chunksize: int = 8 * MiB
    gcs_chunk_size: int = 8 * MiB  # a multiple of 256 KiB (GCS resumable-upload rule)
    max_concurrency: int = 4

    @classmethod
    def from_env(cls, **overrides: Any) -> StorageSettings:
        """Settings from ``EDITINFINITY_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
        ``STORAGE_EMULATOR_HOST``, ``GOOGLE_CLOUD_PROJECT`` and ``EDITINFINITY_STORAGE_{CONNECT_TIMEOUT,READ_TIMEOUT,
        MAX_ATTEMPTS,RETRY_DEADLINE}``; keyword overrides win."""
        values: dict[str, Any] = {
            "s3_endpoint_url": _env_s3_endpoint(),
            "gcs_endpoint": _normalize_endpoint(os.environ.get("STORAGE_EMULATOR_HOST")),
            "gcs_project": os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCLOUD_PROJECT"),
            "connect_timeout": _env_float("EDITINFINITY_STORAGE_CONNECT_TIMEOUT", cls.connect_timeout),
            "read_timeout": _env_float("EDITINFINITY_STORAGE_READ_TIMEOUT", cls.read_timeout),
            "max_attempts": int(_env_float("EDITINFINITY_STORAGE_MAX_ATTEMPTS", cls.max_attempts)),
            "retry_deadline": _env_float("EDITINFINITY_STORAGE_RETRY_DEADLINE", cls.retry_deadline),
        }
        values.update(overrides)
        s = cls(**values)
        if s.gcs_chunk_size % (256 * 1024):
            raise StorageError(f"gcs_chunk_size={s.gcs_chunk_size} must be a multiple of 256 KiB")
        return s


def _env_s3_endpoint() -> str | None:
    for name in ("EDITINFINITY_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return _normalize_endpoint(os.environ[name])
    return None


def _settings(settings: StorageSettings | None) -> StorageSettings:
    return settings if settings is not None else StorageSettings.from_env()


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


def _current_umask() -> int:
    # os.umask() is a process-wide set-and-restore (racy under threads); Linux exposes it read-only instead.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


_UMASK = _current_umask()


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
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, dest)
        return result
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _make_temp_dir_near(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))


def _install_dir(tmp: Path, dest: Path, *, replace_existing: bool = True) -> bool:
    """Rename the finished ``tmp`` directory onto ``dest``.

    An existing ``dest`` directory is moved aside first and deleted after the rename (``replace_existing``), or
    kept and ``tmp`` discarded (``replace_existing=False``, used by the cache where another process may have won
    the race). Returns True when ``tmp`` was installed.
    """
    os.chmod(tmp, 0o777 & ~_UMASK)
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
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
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


class _Backend:
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

    def list_objects(self, u: StorageURI, limit: int | None = None) -> list[ObjectInfo]:
        """Objects under ``u`` seen as a directory (recursive), at most ``limit`` of them."""
        raise NotImplementedError

    def delete_object(self, u: StorageURI) -> None:
        raise NotImplementedError

    def bucket_exists(self, bucket: str) -> bool:
        return True

    # -- error mapping (overridden) --------------------------------------------------------------------------
    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        """(kind, detail) for errors this backend understands; None lets the exception propagate unchanged."""
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


class _LocalBackend(_Backend):
    scheme = "file"

    def stat_object(self, u: StorageURI) -> ObjectInfo:
        st = os.stat(u.key)
        if not os.path.isfile(u.key):
            raise IsADirectoryError(21, "is a directory", u.key)
        return ObjectInfo(uri=u.key, size=st.st_size, generation=str(st.st_mtime_ns))

    def download_object(self, u: StorageURI, dest: Path, info: ObjectInfo | None = None) -> None:
        shutil.copyfile(u.key, dest)

    def upload_file(self, src: Path, u: StorageURI, size: int, metadata: dict[str, str]) -> None:
        _atomic_write(Path(u.key), lambda tmp: shutil.copyfile(src, tmp))

    def get_bytes(self, u: StorageURI) -> bytes:
        return Path(u.key).read_bytes()

    def put_bytes(self, u: StorageURI, data: bytes, metadata: dict[str, str]) -> None:
        _atomic_write(Path(u.key), lambda tmp: tmp.write_bytes(data))

    def list_objects(self, u: StorageURI, limit: int | None = None) -> list[ObjectInfo]:
        root = Path(u.key)
        if not root.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(root):
            for fname in files:
                p = Path(dirpath, fname)
                if p.is_file():
                    st = p.stat()
                    out.append(ObjectInfo(uri=str(p), size=st.st_size, generation=str(st.st_mtime_ns),
                                          rel=p.relative_to(root).as_posix()))
        return sorted(out, key=lambda o: o.rel)

    def delete_object(self, u: StorageURI) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(u.key)

    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        if isinstance(exc, FileNotFoundError):
            return "not_found", f"{exc.strerror}: {exc.filename}"
        if isinstance(exc, PermissionError):
            return "forbidden", f"{exc.strerror}: {exc.filename}"
        if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
            return "invalid", f"{exc.strerror}: {exc.filename}"
        if isinstance(exc, OSError):
            return "other", f"{exc.strerror or exc}: {exc.filename}"
        return None

    def fix(self, kind: str, u: StorageURI, op: str) -> str:
        if kind == "forbidden":
            return "check the file permissions and that the folder is writable (or choose another path)"
        if kind == "invalid":
            return "a directory is where a file is expected or the reverse; use download_dir/upload_dir for folders"
        if kind == "other":
            return "check free disk space (set EDITINFINITY_CACHE / TMPDIR to a larger disk) and the path"
        return super().fix(kind, u, op)


# ---- S3 --------------------------------------------------------------------------------------------------------

_S3_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_S3_CRED_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "MissingSecurityHeader", "UnrecognizedClientException",
    "InvalidSecurity", "RequestTimeTooSkewed", "401",
}
_S3_FORBIDDEN_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_S3_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_S3_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "BandwidthLimitExceeded", "PreconditionFailed",
    "OperationAborted", "XAmzContentSHA256Mismatch", "BadDigest",
}
_S3_CLIENTS: dict[tuple, Any] = {}
_S3_LOCK = threading.Lock()


class _S3Backend(_Backend):
    scheme = "s3"

    def endpoint(self) -> str | None:
        return self.settings.s3_endpoint_url or _env_s3_endpoint()

    def client(self) -> Any:
        """A boto3 S3 client for the current endpoint and credential environment (cached; clients are thread-safe)."""
        s = self.settings
        creds = hashlib.sha256("\0".join(os.environ.get(k) or "" for k in _S3_CRED_ENV).encode()).hexdigest()
        key = (self.endpoint(), s.connect_timeout, s.read_timeout, s.max_concurrency, creds)
        with _S3_LOCK:
            c = _S3_CLIENTS.get(key)
            if c is not None:
                return c
        import boto3
        from botocore.config import Config

        endpoint = self.endpoint()
        cfg = Config(
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            retries={"total_max_attempts": 1},  # our retry loop bounds count and time; no hidden retries below it
            max_pool_connections=max(10, 2 * s.max_concurrency),
            # MinIO/Ceph/moto behind a plain host:port need path-style addressing.
            s3={"addressing_style": "path"} if endpoint else {},
        )
        session = boto3.session.Session()
        region = session.region_name or ("us-east-1" if endpoint else None)
        c = session.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
        with _S3_LOCK:
            if len(_S3_CLIENTS) > 16:
                _S3_CLIENTS.clear()
            _S3_CLIENTS[key] = c
        return c

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )

    def stat_object(self, u: StorageURI) -> ObjectInfo:
        r = self.client().head_object(Bucket=u.bucket, Key=u.key)
        etag = (r.get("ETag") or "").strip('"') or None
        md5 = etag if etag and "-" not in etag and re.fullmatch(r"[0-9a-f]{32}", etag) else None
        return ObjectInfo(uri=str(u), size=int(r["ContentLength"]), etag=etag, generation=r.get("VersionId"),
                          sha256=(r.get("Metadata") or {}).get(SHA256_METADATA_KEY), md5=md5)

    def download_object(self, u: StorageURI, dest: Path, info: ObjectInfo | None = None) -> None:
        self.client().download_file(u.bucket, u.key, str(dest), Config=self._transfer_config())

    def upload_file(self, src: Path, u: StorageURI, size: int, metadata: dict[str, str]) -> None:
        self.client().upload_file(str(src), u.bucket, u.key, ExtraArgs={"Metadata": metadata},
                                  Config=self._transfer_config())

    def get_bytes(self, u: StorageURI) -> bytes:
        return self.client().get_object(Bucket=u.bucket, Key=u.key)["Body"].read()

    def put_bytes(self, u: StorageURI, data: bytes, metadata: dict[str, str]) -> None:
        self.client().put_object(Bucket=u.bucket, Key=u.key, Body=data, Metadata=metadata)

    def list_objects(self, u: StorageURI, limit: int | None = None) -> list[ObjectInfo]:
        prefix = u.dir_prefix()
        out = []
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=u.bucket, Prefix=prefix, PaginationConfig={"MaxItems": limit} if limit else {})
        for page in pages:
            for o in page.get("Contents", []):
                etag = (o.get("ETag") or "").strip('"') or None
                out.append(ObjectInfo(uri=f"s3://{u.bucket}/{o['Key']}", size=int(o["Size"]), etag=etag,
                                      rel=o["Key"][len(prefix):]))
        return out

    def delete_object(self, u: StorageURI) -> None:
        self.client().delete_object(Bucket=u.bucket, Key=u.key)

    def bucket_exists(self, bucket: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client().head_bucket(Bucket=bucket)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise

    def refine(self, kind: str, u: StorageURI) -> tuple[str, str]:
        if kind == "forbidden":
            # HEAD answers carry no error body: a bare 403 may be a bad key. A listing call says which.
            from botocore.exceptions import ClientError

            try:
                self.client().list_objects_v2(Bucket=u.bucket, Prefix=u.key, MaxKeys=1)
            except ClientError as e:
                err = e.response.get("Error", {})
                if err.get("Code") in _S3_CRED_CODES:
                    return "credentials", f"a listing call said {err.get('Code')}: {err.get('Message', '')}"
            except Exception:  # best effort: keep the original diagnosis
                pass
            return kind, ""
        return super().refine(kind, u)

    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        from botocore import exceptions as bx

        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", ""))
            status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            detail = f"{code or status}: {err.get('Message', '')} (HTTP {status})".strip()
            if code == "NoSuchBucket":
                return "no_bucket", detail
            if code in _S3_CRED_CODES:
                return "credentials", detail
            if code in _S3_FORBIDDEN_CODES:
                return "forbidden", detail
            if code in _S3_NOT_FOUND_CODES:
                return "not_found", detail
            if code in _S3_TRANSIENT_CODES or status >= 500 or status == 429:
                return "transient", detail
            if code in ("InvalidBucketName", "InvalidArgument", "KeyTooLongError", "InvalidRequest"):
                return "invalid", detail
            return "other", detail
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
                            bx.ProfileNotFound)):
            return "credentials", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, bx.SSLError):
            return "tls", str(exc)
        if isinstance(exc, (bx.EndpointConnectionError, bx.ProxyConnectionError)):  # incl. ConnectTimeoutError
            return "unreachable", str(exc)
        if isinstance(exc, (bx.HTTPClientError, bx.ConnectionError, bx.FlexibleChecksumError)):
            return "transient", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, bx.NoRegionError):
            return "invalid", f"{exc} (set AWS_DEFAULT_REGION)"
        if isinstance(exc, bx.BotoCoreError):
            return "other", f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "S3UploadFailedError":
            return "other", str(exc)
        if isinstance(exc, ValueError) and "endpoint" in str(exc).lower():
            return "invalid", f"{exc} (check AWS_ENDPOINT_URL / EDITINFINITY_S3_ENDPOINT)"
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return "transient", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError):
            return "other", f"{type(exc).__name__}: {exc}"
        return None

    def fix(self, kind: str, u: StorageURI, op: str) -> str:
        ep = self.endpoint()
        where = f"the S3 endpoint {ep}" if ep else "AWS S3"
        if kind == "credentials":
            return (
                f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys), or "
                f"AWS_PROFILE, to credentials valid for {where}; on EKS use IRSA/pod identity; in KFP mount the "
                "credential Secret as these environment variables"
            )
        if kind == "no_bucket":
            mb = f"aws s3 mb s3://{u.bucket}" + (f" --endpoint-url {ep}" if ep else "")
            return (f"create the bucket ({mb}) or correct the bucket name {u.bucket!r} in the URI; check that "
                    f"AWS_ENDPOINT_URL points at the right server (now {ep or 'unset: AWS'})")
        if kind == "forbidden":
            action = {"download": "s3:GetObject", "read": "s3:GetObject", "stat": "s3:GetObject",
                      "list": "s3:ListBucket"}.get(op, "s3:PutObject/s3:DeleteObject")
            return (f"the credentials are valid but may not do this: grant {action} (and s3:ListBucket) on "
                    f"arn:aws:s3:::{u.bucket}/* in the IAM or bucket policy, or use other credentials")
        if kind == "unreachable":
            return (f"could not connect to {ep or 'the AWS S3 endpoint'}: check AWS_ENDPOINT_URL / "
                    f"EDITINFINITY_S3_ENDPOINT (now {ep or 'unset'}), that the server is running, and the network/"
                    "proxy settings (HTTPS_PROXY, NO_PROXY)")
        if kind == "tls":
            return ("check the endpoint's scheme (http vs https) in AWS_ENDPOINT_URL and the CA bundle "
                    "(AWS_CA_BUNDLE) for self-signed MinIO/Ceph certificates")
        return super().fix(kind, u, op)


# ---- GCS -------------------------------------------------------------------------------------------------------

# One client per configuration, shared by threads (as google-cloud-storage's own transfer_manager does), so
# application-default credentials are fetched once per process, not once per worker thread.
_GCS_CLIENTS: dict[tuple, Any] = {}
_GCS_LOCK = threading.Lock()


class _GCSBackend(_Backend):
    scheme = "gs"

    def endpoint(self) -> str | None:
        return self.settings.gcs_endpoint or _normalize_endpoint(os.environ.get("STORAGE_EMULATOR_HOST"))

    def client(self) -> Any:
        """A google-cloud-storage client: anonymous against an emulator, application-default credentials otherwise."""
        endpoint = self.endpoint()
        key = (endpoint, self.settings.gcs_project, os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"))
        with _GCS_LOCK:
            c = _GCS_CLIENTS.get(key)
            if c is not None:
                return c
        from google.cloud import storage

        if endpoint:
            from google.auth.credentials import AnonymousCredentials

            c = storage.Client(project=self.settings.gcs_project or "editinfinity", credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": endpoint})
        else:
            c = storage.Client(project=self.settings.gcs_project)
        with _GCS_LOCK:
            if len(_GCS_CLIENTS) > 16:
                _GCS_CLIENTS.clear()
            _GCS_CLIENTS[key] = c
        return c

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout, self.settings.read_timeout)

    def _blob(self, u: StorageURI, **kw: Any) -> Any:
        return self.client().bucket(u.bucket).blob(u.key, **kw)

    def stat_object(self, u: StorageURI) -> ObjectInfo:
        b = self._blob(u)
        b.reload(timeout=self._timeout, retry=None)
        md5 = None
        if b.md5_hash:
            import base64

            md5 = base64.b64decode(b.md5_hash).hex()
        return ObjectInfo(uri=str(u), size=int(b.size or 0), etag=b.etag,
                          generation=str(b.generation) if b.generation is not None else None,
                          sha256=(b.metadata or {}).get(SHA256_METADATA_KEY), md5=md5, crc32c=b.crc32c)

    def download_object(self, u: StorageURI, dest: Path, info: ObjectInfo | None = None) -> None:
        # Pin the generation we stat-ed: a concurrent overwrite then fails with 412 and is retried from stat.
        gen = int(info.generation) if info is not None and info.generation else None
        self._blob(u).download_to_filename(str(dest), timeout=self._timeout, retry=None, checksum="auto",
                                           if_generation_match=gen)

    def upload_file(self, src: Path, u: StorageURI, size: int, metadata: dict[str, str]) -> None:
        # Above the threshold: resumable upload in chunks of gcs_chunk_size.
        chunk = self.settings.gcs_chunk_size if size > self.settings.multipart_threshold else None
        b = self._blob(u, chunk_size=chunk)
        b.metadata = metadata
        b.upload_from_filename(str(src), timeout=self._timeout, retry=None)

    def get_bytes(self, u: StorageURI) -> bytes:
        return self._blob(u).download_as_bytes(timeout=self._timeout, retry=None)

    def put_bytes(self, u: StorageURI, data: bytes, metadata: dict[str, str]) -> None:
        b = self._blob(u)
        b.metadata = metadata
        b.upload_from_string(data, content_type="application/octet-stream", timeout=self._timeout, retry=None)

    def list_objects(self, u: StorageURI, limit: int | None = None) -> list[ObjectInfo]:
        prefix = u.dir_prefix()
        out = []
        for b in self.client().list_blobs(u.bucket, prefix=prefix or None, max_results=limit,
                                          timeout=self._timeout, retry=None):
            out.append(ObjectInfo(uri=f"gs://{u.bucket}/{b.name}", size=int(b.size or 0), etag=b.etag,
                                  generation=str(b.generation) if b.generation is not None else None,
                                  sha256=(b.metadata or {}).get(SHA256_METADATA_KEY), crc32c=b.crc32c,
                                  rel=b.name[len(prefix):]))
        return out

    def delete_object(self, u: StorageURI) -> None:
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self._blob(u).delete(timeout=self._timeout, retry=None)

    def bucket_exists(self, bucket: str) -> bool:
        return bool(self.client().bucket(bucket).exists(timeout=self._timeout, retry=None))

    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        import google.auth.exceptions as gauth
        import requests
        from google.api_core import exceptions as gx
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

        def by_status(status: int, detail: str) -> tuple[str, str]:
            if status == 404:
                return "not_found", detail
            if status == 401:
                return "credentials", detail
            if status == 403:
                return "forbidden", detail
            if status in (408, 412, 429) or status >= 500:
                return "transient", detail
            if status == 400:
                return "invalid", detail
            return "other", detail

        if isinstance(exc, gx.GoogleAPICallError):
            return by_status(int(exc.code or 0), f"HTTP {exc.code}: {exc.message}")
        if isinstance(exc, DataCorruption):
            return "integrity", str(exc)
        if isinstance(exc, InvalidResponse):
            status = int(getattr(getattr(exc, "response", None), "status_code", 0) or 0)
            return by_status(status, f"HTTP {status}: {exc}")
        if isinstance(exc, (gauth.DefaultCredentialsError, gauth.RefreshError)):
            return "credentials", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, gauth.TransportError):
            return "unreachable", str(exc)
        if isinstance(exc, requests.exceptions.SSLError):
            return "tls", str(exc)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return "unreachable", str(exc)
        if isinstance(exc, requests.exceptions.ConnectionError):
            text = str(exc)
            if any(t in text for t in ("NewConnectionError", "Failed to establish", "Connection refused",
                                       "Name or service not known", "nodename nor servname")):
                return "unreachable", text
            return "transient", text
        if isinstance(exc, (requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError,
                            ConnectionError, TimeoutError)):
            return "transient", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError):
            return "other", f"{type(exc).__name__}: {exc}"
        return None

    def fix(self, kind: str, u: StorageURI, op: str) -> str:
        ep = self.endpoint()
        if kind == "credentials":
            return ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run `gcloud auth "
                    "application-default login`); on GKE use Workload Identity; for an emulator set "
                    "STORAGE_EMULATOR_HOST")
        if kind == "no_bucket":
            return (f"create the bucket (gcloud storage buckets create gs://{u.bucket}) or correct the bucket name "
                    f"{u.bucket!r} in the URI" + (f"; the emulator in use is STORAGE_EMULATOR_HOST={ep}" if ep else ""))
        if kind == "forbidden":
            role = "roles/storage.objectViewer" if op in ("download", "read", "stat", "list") else \
                "roles/storage.objectAdmin"
            return f"grant {role} on gs://{u.bucket} to the service account in use, or use other credentials"
        if kind == "unreachable":
            return (f"could not connect to {ep or 'storage.googleapis.com'}: check STORAGE_EMULATOR_HOST (now "
                    f"{ep or 'unset'}), that the server is running, and the network/proxy settings (HTTPS_PROXY, "
                    "NO_PROXY)")
        if kind == "tls":
            return "check the scheme (http vs https) in STORAGE_EMULATOR_HOST and the CA bundle (REQUESTS_CA_BUNDLE)"
        return super().fix(kind, u, op)


def _backend(u: StorageURI, settings: StorageSettings | None) -> _Backend:
    s = _settings(settings)
    if u.scheme == "s3":
        return _S3Backend(s)
    if u.scheme == "gs":
        return _GCSBackend(s)
    return _LocalBackend(s)


# --------------------------------------------------------------------------------------------------------------
# Single objects
# --------------------------------------------------------------------------------------------------------------


def stat(uri: URILike, *, settings: StorageSettings | None = None) -> ObjectInfo | None:
    """Size, etag/generation and recorded sha256 of one object (or local file); None when it does not exist.

    A missing bucket raises ``StorageError`` (kind ``no_bucket``) rather than returning None.
    """
    u = parse_uri(uri)
    be = _backend(u, settings)
    if not u.is_remote and not os.path.isfile(u.key):
        return None
    try:
        return be.run("stat", u, lambda: be.stat_object(u))
    except StorageError as e:
        if getattr(e, "kind", "") == "not_found":
            return None
        raise


def exists(uri: URILike, *, settings: StorageSettings | None = None) -> bool:
    """True when ``uri`` is an object (a local file or directory), or a prefix with at least one object under it."""
    u = parse_uri(uri)
    if not u.is_remote:
        return os.path.exists(u.key)
    if u.key and not u.key.endswith("/") and stat(u, settings=settings) is not None:
        return True
    be = _backend(u, settings)
    return bool(be.run("list", u, lambda: be.list_objects(u, limit=1)))


def list_uri(uri: URILike, *, settings: StorageSettings | None = None) -> list[str]:
    """Full URIs of every object under ``uri`` taken as a directory (recursive, sorted)."""
    return [o.uri for o in list_objects(uri, settings=settings)]


def list_objects(uri: URILike, *, settings: StorageSettings | None = None) -> list[ObjectInfo]:
    """``ObjectInfo`` (with ``rel``, the path relative to ``uri``) for every object under ``uri``, sorted."""
    u = parse_uri(uri)
    be = _backend(u, settings)
    objs = be.run("list", u, lambda: be.list_objects(u))
    if u.is_remote and not objs and u.bucket and not be.run("list", u, lambda: be.bucket_exists(u.bucket)):
        raise _storage_error("no_bucket", "list", u, _KIND_SUMMARY["no_bucket"], be.fix("no_bucket", u, "list"),
                             be.endpoint())
    return sorted(objs, key=lambda o: o.rel)


def _verify_file(path: Path, *, size: int | None, sha256: str | None, what: str) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise _IntegrityMismatch(f"{what}: got {actual} bytes, expected {size}")
    if sha256:
        got = sha256_file(path)
        if got != sha256:
            raise _IntegrityMismatch(f"{what}: sha256 {got} != recorded {sha256}")


def _fetch_object(be: _Backend, u: StorageURI, tmp: Path, expect_size: int | None = None,
                  expect_sha256: str | None = None) -> ObjectInfo:
    """Download one object into ``tmp`` with retries; verify size and sha256 (given or recorded at upload)."""

    def attempt() -> ObjectInfo:
        if expect_size is not None and expect_sha256:
            # Everything to check is known (manifest): skip the metadata request.
            be.download_object(u, tmp, None)
            _verify_file(tmp, size=expect_size, sha256=expect_sha256, what=str(u))
            return ObjectInfo(uri=str(u), size=expect_size, sha256=expect_sha256)
        info = be.stat_object(u)
        be.download_object(u, tmp, info)
        _verify_file(tmp, size=expect_size if expect_size is not None else info.size,
                     sha256=expect_sha256 or info.sha256, what=str(u))
        return info

    return be.run("download", u, attempt)


def download(uri: URILike, local_path: str | os.PathLike, *, settings: StorageSettings | None = None) -> Path:
    """Copy one object (or local file) to ``local_path`` atomically; returns the written path.

    When ``local_path`` is an existing directory the object's name is kept inside it. Size and (when recorded by
    ``upload``/``publish_dir``) sha256 are verified; GCS also checks md5/crc32c in transit.
    """
    u = parse_uri(uri)
    dest = Path(local_path)
    if dest.is_dir():
        dest = dest / (u.name or "object")
    be = _backend(u, settings)
    if not u.is_remote and os.path.isdir(u.key):
        raise _storage_error("invalid", "download", u, "is a directory", "use download_dir for directories")
    _atomic_write(dest, lambda tmp: _fetch_object(be, u, tmp))
    log.debug("downloaded %s -> %s", u, dest)
    return dest


def upload(local_path: str | os.PathLike, uri: URILike, *, settings: StorageSettings | None = None) -> str:
    """Upload one local file to ``uri`` (a trailing ``/`` keeps the file name); returns the object URI.

    Large files go multipart (S3, ``multipart_threshold``) or resumable in chunks (GCS, ``gcs_chunk_size``). The
    sha256 is recorded in the object's metadata so ``download`` can verify it end to end.
    """
    src = Path(local_path)
    u = parse_uri(uri)
    if str(uri).endswith("/") or (u.is_remote and not u.key) or (not u.is_remote and os.path.isdir(u.key)):
        u = u.join(src.name)
    if not src.is_file():
        lu = parse_uri(src)
        raise _storage_error("invalid" if src.exists() else "not_found", "upload", lu,
                             "source is not a file", "pass an existing file (use upload_dir for directories)")
    be = _backend(u, settings)
    size = src.stat().st_size
    sha = sha256_file(src) if u.is_remote else ""
    be.run("upload", u, lambda: be.upload_file(src, u, size, {SHA256_METADATA_KEY: sha} if sha else {}))
    log.debug("uploaded %s -> %s (%d bytes)", src, u, size)
    return str(u)


def read_bytes(uri: URILike, *, settings: StorageSettings | None = None) -> bytes:
    """The whole content of one (small) object or local file."""
    u = parse_uri(uri)
    be = _backend(u, settings)
    return be.run("read", u, lambda: be.get_bytes(u))


def write_bytes(uri: URILike, data: bytes, *, settings: StorageSettings | None = None) -> str:
    """Write ``data`` as one object (local files atomically); records its sha256 in the object metadata."""
    u = parse_uri(uri)
    be = _backend(u, settings)
    meta = {SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()} if u.is_remote else {}
    be.run("write", u, lambda: be.put_bytes(u, bytes(data), meta))
    return str(u)


@contextlib.contextmanager
def open_uri(uri: URILike, mode: str = "rb", *, settings: StorageSettings | None = None,
             encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open an object like a file. Reading ("r"/"rb") loads it into memory (small objects; use ``localize`` for
    big ones). Writing ("w"/"wb") goes to a temp file that is uploaded (or renamed, locally) only when the block
    exits without an exception."""
    if mode not in ("r", "rb", "w", "wb"):
        raise StorageError(f"open_uri mode {mode!r} not supported: use 'r', 'rb', 'w' or 'wb'")
    u = parse_uri(uri)
    if mode.startswith("r"):
        data = read_bytes(u, settings=settings)
        if mode == "rb":
            yield io.BytesIO(data)
        else:
            yield io.TextIOWrapper(io.BytesIO(data), encoding=encoding or "utf-8")
        return
    with tempfile.TemporaryDirectory(prefix="editinfinity-open-") as td:
        tmp = Path(td, u.name or "object")
        with open(tmp, mode, **({"encoding": encoding or "utf-8"} if mode == "w" else {})) as fh:
            yield fh
        upload(tmp, u, settings=settings)


# --------------------------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------------------------


def _parallel(fn: Callable[[Any], T], items: list[Any], workers: int) -> list[T]:
    """Run ``fn`` over ``items`` on a small pool; on the first failure cancel what has not started, let running
    transfers finish, and re-raise that failure."""
    if workers <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    ex = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="editinfinity-storage")
    try:
        futures = [ex.submit(fn, i) for i in items]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def build_manifest(local_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a local directory: format, creation time, and per file its relative path, size, sha256."""
    root = Path(local_dir)
    files = [{"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in _walk_files(root)]
    return {
        "format": MANIFEST_FORMAT,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "file_count": len(files),
        "total_bytes": sum(f["size"] for f in files),
        "files": files,
    }


def _parse_manifest(data: bytes, where: str) -> list[dict[str, Any]]:
    try:
        m = json.loads(data)
        if m.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {m.get('format')!r} != {MANIFEST_FORMAT!r}")
        files = m["files"]
        for f in files:
            _safe_rel(f["path"])
            if not isinstance(f["size"], int) or not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]):
                raise ValueError(f"bad entry {f!r}")
        return files
    except _Incomplete:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _Incomplete(f"{where} is not a valid manifest: {exc}") from exc


def upload_dir(local_dir: str | os.PathLike, uri: URILike, *, settings: StorageSettings | None = None) -> list[str]:
    """Upload every file under ``local_dir`` to ``uri``/relative path (no manifest; not atomic for readers).

    Use ``publish_dir`` for stage outputs that others read. Returns the object URIs.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise _storage_error("not_found", "upload_dir", parse_uri(root), "not a directory",
                             "pass an existing local directory")
    u = parse_uri(uri)
    be = _backend(u, settings)
    files = _walk_files(root)

    def one(item: tuple[str, Path]) -> str:
        rel, p = item
        dst = u.join(rel)
        size = p.stat().st_size
        meta = {SHA256_METADATA_KEY: sha256_file(p)} if u.is_remote else {}
        be.run("upload", dst, lambda: be.upload_file(p, dst, size, meta))
        return str(dst)

    return _parallel(one, files, be.settings.max_concurrency)


def publish_dir(local_dir: str | os.PathLike, uri: URILike, *, settings: StorageSettings | None = None) -> str:
    """Publish ``local_dir`` at ``uri`` so that readers see all of it or nothing.

    Remote: delete any existing manifest, upload every file (sha256 in metadata), then write ``_MANIFEST.json``
    last; a failure anywhere leaves no manifest, so ``download_dir`` refuses the partial prefix. Objects already
    under ``uri`` that are not in the new manifest stay but are ignored by readers. Local: copy into a temp folder
    next to the target, write the manifest, rename onto the target (replacing it). Returns the manifest URI.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise _storage_error("not_found", "publish_dir", parse_uri(root), "not a directory",
                             "pass an existing local directory")
    u = parse_uri(uri)
    be = _backend(u, settings)
    manifest = build_manifest(root)
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if not u.is_remote:
        dest = Path(u.key)
        tmp = _make_temp_dir_near(dest)

        def copy_all() -> None:
            for f in manifest["files"]:
                (tmp / f["path"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / f["path"], tmp / f["path"])
            (tmp / MANIFEST_NAME).write_bytes(manifest_bytes)

        try:
            be.run("publish", u, copy_all)
            _install_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("published %s -> %s (%d files)", root, dest, manifest["file_count"])
        return str(dest / MANIFEST_NAME)

    mu = u.join(MANIFEST_NAME)
    # An old manifest must not describe objects we are about to overwrite.
    be.run("publish", mu, lambda: be.delete_object(mu))

    def one(f: dict[str, Any]) -> None:
        dst = u.join(f["path"])
        src = root / f["path"]
        be.run("upload", dst, lambda: be.upload_file(src, dst, f["size"], {SHA256_METADATA_KEY: f["sha256"]}))

    _parallel(one, manifest["files"], be.settings.max_concurrency)
    meta = {SHA256_METADATA_KEY: hashlib.sha256(manifest_bytes).hexdigest()}
    be.run("publish", mu, lambda: be.put_bytes(mu, manifest_bytes, meta))
    log.info("published %s -> %s (%d files, %d bytes)", root, u, manifest["file_count"], manifest["total_bytes"])
    return str(mu)


def _incomplete(op: str, u: StorageURI, what: str, be: _Backend) -> StorageError:
    return _storage_error("incomplete", op, u, what, _INCOMPLETE_FIX, be.endpoint())


def _read_manifest_bytes(u: StorageURI, be: _Backend) -> bytes | None:
    mu = u.join(MANIFEST_NAME)
    try:
        return be.run("read", mu, lambda: be.get_bytes(mu))
    except StorageError as e:
        if getattr(e, "kind", "") == "not_found":
            return None
        raise


def _entries(raw: bytes, u: StorageURI, be: _Backend) -> list[dict[str, Any]]:
    try:
        return _parse_manifest(raw, str(u.join(MANIFEST_NAME)))
    except _Incomplete as exc:
        raise _incomplete("download_dir", u, str(exc), be) from exc


def read_manifest(uri: URILike, *, settings: StorageSettings | None = None) -> list[dict[str, Any]] | None:
    """The file entries (path, size, sha256) of the manifest under ``uri``; None when there is none.

    Raises ``StorageError`` (kind ``incomplete``) when the manifest is malformed.
    """
    u = parse_uri(uri)
    be = _backend(u, settings)
    raw = _read_manifest_bytes(u, be)
    return None if raw is None else _entries(raw, u, be)


_Plan = list[tuple[str, int, "str | None"]]


def _dir_plan(u: StorageURI, be: _Backend, verify: bool) -> tuple[list[dict[str, Any]] | None, _Plan, str]:
    """What to fetch for the directory at ``u``: (manifest entries or None, [(rel, size, sha256)], version token).

    The token is the manifest's sha256 (content-addressed), or a digest of the listing when ``verify=False`` and
    there is no manifest.
    """
    raw = _read_manifest_bytes(u, be)
    if raw is not None:
        entries = _entries(raw, u, be)
        return entries, [(f["path"], f["size"], f["sha256"]) for f in entries], \
            "manifest|" + hashlib.sha256(raw).hexdigest()
    # Zero-byte keys ending in "/" are folder markers made by consoles, not files.
    objs = [o for o in list_objects(u, settings=be.settings) if not (o.rel.endswith("/") and o.size == 0)]
    if not objs:
        raise _storage_error("not_found", "download_dir", u, f"nothing there (no {MANIFEST_NAME}, no objects)",
                             _COMMON_FIXES["not_found"], be.endpoint())
    if verify:
        raise _incomplete("download_dir", u, f"no {MANIFEST_NAME} under it, though {len(objs)} object(s) are (a "
                          "partial or unpublished upload)", be)
    try:
        plan: _Plan = [(_safe_rel(o.rel), o.size, o.sha256) for o in objs]
    except _Incomplete as exc:
        raise _incomplete("download_dir", u, str(exc), be) from exc
    token = "listing|" + hashlib.sha256(
        "\n".join(f"{o.rel}|{o.size}|{o.etag}|{o.generation}" for o in objs).encode()).hexdigest()
    return None, plan, token


def _download_plan(u: StorageURI, be: _Backend, entries: list[dict[str, Any]] | None, plan: _Plan, dest: Path,
                   replace_existing: bool) -> bool:
    tmp = _make_temp_dir_near(dest)
    try:
        def one(item: tuple[str, int, str | None]) -> None:
            rel, size, sha = item
            src = u.join(rel)
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                _fetch_object(be, src, target, expect_size=size, expect_sha256=sha)
            except StorageError as e:
                if entries is not None and getattr(e, "kind", "") == "not_found":
                    raise _incomplete("download_dir", src, f"listed in {MANIFEST_NAME} but missing", be) from e
                raise

        _parallel(one, plan, be.settings.max_concurrency)
        if entries is not None:
            (tmp / MANIFEST_NAME).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1))
        return _install_dir(tmp, dest, replace_existing=replace_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def download_dir(uri: URILike, local_dir: str | os.PathLike, *, verify: bool = True,
                 settings: StorageSettings | None = None) -> Path:
    """Download the directory at ``uri`` into ``local_dir`` (built in a temp folder, then renamed into place,
    replacing an existing ``local_dir``).

    With ``verify`` (default) the prefix must carry a ``_MANIFEST.json`` written by ``publish_dir``: exactly its files
    are fetched and each size and sha256 checked; a missing manifest or object raises ``StorageError`` (kind
    ``incomplete``; a mismatch: ``integrity``). ``verify=False`` accepts a prefix without manifest (trees written by
    other tools) and fetches everything under it, still checking sizes and any sha256 recorded at upload.
    """
    u = parse_uri(uri)
    dest = Path(local_dir)
    be = _backend(u, settings)
    entries, plan, _token = _dir_plan(u, be, verify)
    _download_plan(u, be, entries, plan, dest, replace_existing=True)
    log.info("downloaded %s -> %s (%d files)", u, dest, len(plan))
    return dest


# --------------------------------------------------------------------------------------------------------------
# Stage helpers: cached inputs, staged outputs
# --------------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$EDITINFINITY_CACHE`` or ``~/.cache/editinfinity``."""
    return Path(os.environ.get("EDITINFINITY_CACHE") or Path.home() / ".cache" / "editinfinity").expanduser()


def _cache_target(u: StorageURI, token: str) -> Path:
    digest = hashlib.sha256(f"{u}\n{token}".encode()).hexdigest()[:32]
    return cache_root() / "objects" / digest / (u.name or u.bucket)


def cached_path(uri: URILike, *, verify: bool = True, settings: StorageSettings | None = None) -> Path:
    """A local path holding ``uri``: local paths are returned as they are; a remote object or published directory
    is downloaded once into the cache (``cache_root()``), keyed by URI + etag/generation, so a re-published input
    is fetched anew and an unchanged one is not.

    A remote URI is a file when an object has exactly that key, else a directory (published with a manifest, or
    any prefix when ``verify=False``).
    """
    u = parse_uri(uri)
    if not u.is_remote:
        if not os.path.exists(u.key):
            raise _storage_error("not_found", "localize", u, "no such file or directory", _COMMON_FIXES["not_found"])
        return Path(u.key)
    be = _backend(u, settings)
    info = stat(u, settings=be.settings) if u.key and not u.key.endswith("/") else None
    if info is None:
        entries, plan, token = _dir_plan(u, be, verify)
        target = _cache_target(u, token)
        if target.is_dir():
            log.debug("cache hit %s -> %s", u, target)
            return target
        _download_plan(u, be, entries, plan, target, replace_existing=False)
        log.info("cached %s -> %s (%d files)", u, target, len(plan))
        return target
    target = _cache_target(u, info.version_token)
    if target.is_file():
        log.debug("cache hit %s -> %s", u, target)
        return target
    staging = cache_root() / "objects" / ".incoming"
    staging.mkdir(parents=True, exist_ok=True)
    tmp_name = staging / f"{uuid.uuid4().hex}.part"
    try:
        got = _fetch_object(be, u, tmp_name)
        # Key the cache by what was actually downloaded (the object may have changed since the first stat).
        target = _cache_target(u, got.version_token)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, target)
    finally:
        with contextlib.suppress(OSError):
            tmp_name.unlink()
    log.info("cached %s -> %s", u, target)
    return target


@contextlib.contextmanager
def localize(uri: URILike, *, verify: bool = True, settings: StorageSettings | None = None) -> Iterator[Path]:
    """Context manager: a local path for an input given as path or URI (see ``cached_path``). Cached copies stay
    in the cache after the block; treat them as read-only."""
    yield cached_path(uri, verify=verify, settings=settings)


@contextlib.contextmanager
def staged_output(uri: URILike, *, settings: StorageSettings | None = None) -> Iterator[Path]:
    """Context manager: an empty local directory for a stage to fill; published to ``uri`` only on success.

    Local ``uri``: the directory is a temp folder next to the target, renamed onto it (with a manifest) when the
    block exits normally. Remote ``uri``: a temp folder published with ``publish_dir``. On an exception nothing is
    published and the temp folder is removed.
    """
    u = parse_uri(uri)
    if not u.is_remote:
        dest = Path(u.key)
        tmp = _make_temp_dir_near(dest)
        try:
            yield tmp
            (tmp / MANIFEST_NAME).write_text(json.dumps(build_manifest(tmp), indent=1, sort_keys=True))
            _install_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("wrote %s", dest)
        return
    tmp = Path(tempfile.mkdtemp(prefix="editinfinity-stage-"))
    try:
        yield tmp
        publish_dir(tmp, u, settings=settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "MANIFEST_NAME",
    "ObjectInfo",
    "StorageSettings",
    "StorageURI",
    "build_manifest",
    "cache_root",
    "cached_path",
    "download",
    "download_dir",
    "exists",
    "is_remote",
    "list_objects",
    "list_uri",
    "localize",
    "open_uri",
    "parse_uri",
    "publish_dir",
    "read_bytes",
    "read_manifest",
    "sha256_file",
    "stat",
    "staged_output",
    "upload",
    "upload_dir",
    "write_bytes",
]
