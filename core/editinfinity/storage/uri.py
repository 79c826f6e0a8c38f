"""URIs: what a URI names (local paths, ``file://``, ``gs://``, ``s3://``)."""


from __future__ import annotations

import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from editinfinity.errors import StorageError

log = logging.getLogger(__name__)


SCHEMES = ("file", "gs", "s3")
_SCHEME_ALIASES = {"gcs": "gs", "file": "file", "gs": "gs", "s3": "s3"}



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


class InvalidURIError(StorageError):
    """A location that is not a usable path or URI: bad input (exit status 2), not a storage failure."""

    exit_code = 2


#: Schemes that, written without ``//`` (``s3:/x``, ``gs:x``), show a mistyped URI rather than a file name.
_URL_SCHEMES = frozenset({"s3", "gs", "gcs", "file", "http", "https", "ftp", "sftp", "ssh", "hf", "hdfs", "az",
                          "abfs", "abfss", "wasb", "wasbs", "s3a", "s3n", "oci", "r2"})


def parse_uri(uri: URILike) -> StorageURI:
    """Parse a local path, ``file://`` URL, ``gs://bucket/key`` or ``s3://bucket/key``.

    Raises :class:`InvalidURIError` (a ``StorageError``) for other schemes, a missing bucket name, or a mistyped
    URI such as ``s3:/bucket/key`` or ``gs:bucket`` (never taken as a relative path).
    """
    if isinstance(uri, StorageURI):
        return uri
    if isinstance(uri, os.PathLike):
        return StorageURI("file", "", os.path.abspath(os.path.expanduser(os.fspath(uri))))
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidURIError(f"not a path or URI: {uri!r}")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", uri)
    if not m:
        bad = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!//)", uri)
        if bad and bad.group(1).lower() in _URL_SCHEMES:
            scheme = bad.group(1).lower()
            example = "file:///absolute/path" if scheme == "file" else f"{scheme}://BUCKET/KEY"
            raise InvalidURIError(f"{uri!r} looks like a mistyped {scheme} URI; write {example} (or ./{uri} for a "
                                  "local file of that name)")
        return StorageURI("file", "", os.path.abspath(os.path.expanduser(uri)))
    raw_scheme, rest = m.group(1).lower(), m.group(2)
    scheme = _SCHEME_ALIASES.get(raw_scheme)
    if scheme is None:
        raise InvalidURIError(
            f"unsupported URI scheme {raw_scheme!r} in {uri!r}: use a local path, file://, gs://bucket/key or "
            "s3://bucket/key (download other sources first)"
        )
    if scheme == "file":
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURIError(f"{uri!r}: file:// URIs must name a local path (file:///abs/path)")
        return StorageURI("file", "", os.path.abspath(urllib.parse.unquote(parsed.path)))
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InvalidURIError(f"{uri!r} has no bucket name: write {scheme}://BUCKET/KEY")
    return StorageURI(scheme, bucket, key)


def has_scheme(uri: URILike) -> bool:
    """True for ``scheme://...`` (``file://``, ``gs://``, ``s3://``, or any other), False for a plain path: the one
    test for "is this a URI" (``is_remote`` says whether it names an object store)."""
    return isinstance(uri, StorageURI) or "://" in str(uri)


def file_uri_path(value):
    """A ``file://`` URI (or a mistyped ``file:`` one, refused) as its local path; anything else unchanged (a plain
    path, a hub id such as ``google/flan-t5-xl``, a ``gs://`` / ``s3://`` URI): for the options that take a local
    path or something that is not a path at all (``--weights``, ``--text-encoder``, checkpoint files)."""
    if isinstance(value, str) and value[:5].lower() == "file:":
        return parse_uri(value).key
    return value


def join_uri(base: str | os.PathLike, *parts: str) -> str:
    """``parts`` under ``base``: joined with '/' for a URI, as a path of this OS for a local path."""
    base = str(base)
    if has_scheme(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def is_remote(uri: URILike) -> bool:
    """True when ``uri`` names an object store (``gs://``, ``s3://``), False for local paths and ``file://``."""
    return parse_uri(uri).is_remote
