"""Object storage by URI: local paths (and ``file://``), ``gs://bucket/key`` and ``s3://bucket/key``.

Stages pass artifacts through object storage; everything that takes a path also takes a URI. This package is the
one place that talks to the stores (``uri``, ``settings``, one module per backend: ``local``, ``s3``, ``gcs`` over
``base``; ``objects``: single objects; ``publish``: directories and the manifest; ``cache``: cached inputs and staged
outputs):

* ``parse_uri`` / ``is_remote``: what a URI names.
* ``download`` / ``upload`` (one file), ``download_dir`` / ``upload_dir`` (a tree), ``read_bytes`` / ``write_bytes``,
  ``create_bytes`` (only if absent: one conditional request), ``open_uri``, ``exists``, ``stat``, ``list_uri``.
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

from .base import MANIFEST_NAME, ObjectInfo, sha256_file
from .cache import cache_root, cached_path, localize, staged_output
from .objects import (
    create_bytes,
    delete,
    download,
    exists,
    list_objects,
    list_uri,
    open_uri,
    read_bytes,
    stat,
    upload,
    write_bytes,
)
from .publish import build_manifest, download_dir, publish_dir, read_manifest, upload_dir
from .settings import StorageSettings
from .uri import InvalidURIError, StorageURI, file_uri_path, has_scheme, is_remote, join_uri, parse_uri

# What callers use (the CLI, stages, runtime, evaluation, tests); the backends stay inside the package.
__all__ = [
    "InvalidURIError",
    "MANIFEST_NAME",
    "ObjectInfo",
    "StorageSettings",
    "StorageURI",
    "build_manifest",
    "cache_root",
    "cached_path",
    "create_bytes",
    "delete",
    "download",
    "download_dir",
    "exists",
    "file_uri_path",
    "has_scheme",
    "is_remote",
    "join_uri",
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
