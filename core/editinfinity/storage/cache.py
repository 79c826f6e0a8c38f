"""Stage helpers: inputs cached by URI + version (``cached_path``, ``localize``), outputs published on success (``staged_output``)."""


from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..scratch import make_scratch
from .base import (
    _COMMON_FIXES,
    MANIFEST_NAME,
    _install_dir,
    _make_temp_dir_near,
    _storage_error,
    current_umask,
)
from .objects import _fetch_object, backend_for, stat
from .publish import _dir_plan, _download_plan, build_manifest, publish_dir
from .settings import StorageSettings
from .uri import StorageURI, URILike, parse_uri

log = logging.getLogger(__name__)


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
    be = backend_for(u, settings)
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
        os.chmod(tmp_name, 0o666 & ~current_umask())
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
    tmp = make_scratch("editinfinity-stage")
    try:
        yield tmp
        publish_dir(tmp, u, settings=settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
