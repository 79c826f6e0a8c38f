"""Single objects by URI: stat, exists, list, download, upload, read/write bytes, open."""


from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from editinfinity.errors import StorageError

from ..scratch import scratch_dir
from .base import (
    _KIND_SUMMARY,
    SHA256_METADATA_KEY,
    Backend,
    ObjectExists,
    ObjectInfo,
    _atomic_write,
    _IntegrityMismatch,
    _storage_error,
    sha256_file,
)
from .gcs import GCSBackend
from .local import LocalBackend
from .s3 import S3Backend
from .settings import StorageSettings, resolve_settings
from .uri import StorageURI, URILike, parse_uri

log = logging.getLogger(__name__)


def backend_for(u: StorageURI, settings: StorageSettings | None) -> Backend:
    s = resolve_settings(settings)
    if u.scheme == "s3":
        return S3Backend(s)
    if u.scheme == "gs":
        return GCSBackend(s)
    return LocalBackend(s)


# --------------------------------------------------------------------------------------------------------------
# Single objects
# --------------------------------------------------------------------------------------------------------------


def stat(uri: URILike, *, settings: StorageSettings | None = None) -> ObjectInfo | None:
    """Size, etag/generation and recorded sha256 of one object (or local file); None when it does not exist.

    A missing bucket raises ``StorageError`` (kind ``no_bucket``) rather than returning None.
    """
    u = parse_uri(uri)
    be = backend_for(u, settings)
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
    be = backend_for(u, settings)
    return bool(be.run("list", u, lambda: be.list_objects(u, limit=1)))


def list_uri(uri: URILike, *, settings: StorageSettings | None = None) -> list[str]:
    """Full URIs of every object under ``uri`` taken as a directory (recursive, sorted)."""
    return [o.uri for o in list_objects(uri, settings=settings)]


def list_objects(uri: URILike, *, settings: StorageSettings | None = None) -> list[ObjectInfo]:
    """``ObjectInfo`` (with ``rel``, the path relative to ``uri``) for every object under ``uri``, sorted."""
    u = parse_uri(uri)
    be = backend_for(u, settings)
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


def _fetch_object(be: Backend, u: StorageURI, tmp: Path, expect_size: int | None = None,
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
    be = backend_for(u, settings)
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
    be = backend_for(u, settings)
    size = src.stat().st_size
    sha = sha256_file(src) if u.is_remote else ""
    be.run("upload", u, lambda: be.upload_file(src, u, size, {SHA256_METADATA_KEY: sha} if sha else {}))
    log.debug("uploaded %s -> %s (%d bytes)", src, u, size)
    return str(u)


def read_bytes(uri: URILike, *, settings: StorageSettings | None = None) -> bytes:
    """The whole content of one (small) object or local file."""
    u = parse_uri(uri)
    be = backend_for(u, settings)
    return be.run("read", u, lambda: be.get_bytes(u))


def write_bytes(uri: URILike, data: bytes, *, settings: StorageSettings | None = None) -> str:
    """Write ``data`` as one object (local files atomically); records its sha256 in the object metadata."""
    u = parse_uri(uri)
    be = backend_for(u, settings)
    meta = {SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()} if u.is_remote else {}
    be.run("write", u, lambda: be.put_bytes(u, bytes(data), meta))
    return str(u)


def create_bytes(uri: URILike, data: bytes, *, settings: StorageSettings | None = None) -> bool:
    """Create the object ``uri`` holding ``data`` only if nothing is there (one conditional request: S3
    ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, a local hard link). True when this call created it, False
    when it already existed (left as it was)."""
    u = parse_uri(uri)
    be = backend_for(u, settings)
    try:
        be.run("create", u, lambda: be.create_bytes(u, bytes(data)))
    except ObjectExists:
        return False
    return True


def delete(uri: URILike, *, settings: StorageSettings | None = None) -> None:
    """Remove one object (or local file); a missing one is not an error."""
    u = parse_uri(uri)
    be = backend_for(u, settings)
    be.run("delete", u, lambda: be.delete_object(u))


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
    with scratch_dir("editinfinity-open") as td:
        tmp = Path(td, u.name or "object")
        with open(tmp, mode, **({"encoding": encoding or "utf-8"} if mode == "w" else {})) as fh:
            yield fh
        upload(tmp, u, settings=settings)
