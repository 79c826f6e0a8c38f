"""Directories by URI: upload, atomic publish with a ``_MANIFEST.json`` written last, verified download."""


from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from editinfinity.errors import StorageError

from .base import (
    _COMMON_FIXES,
    _INCOMPLETE_FIX,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SHA256_METADATA_KEY,
    Backend,
    T,
    _Incomplete,
    _install_dir,
    _make_temp_dir_near,
    _safe_rel,
    _storage_error,
    _walk_files,
    sha256_file,
)
from .objects import _fetch_object, backend_for, list_objects
from .settings import StorageSettings
from .uri import StorageURI, URILike, parse_uri

log = logging.getLogger(__name__)


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


def _source_and_target(op: str, local_dir: str | os.PathLike, uri: URILike,
                       settings: StorageSettings | None) -> tuple[Path, StorageURI, Backend]:
    """The local folder ``op`` sends (refused unless it is one), the target URI and its backend."""
    root = Path(local_dir)
    if not root.is_dir():
        raise _storage_error("not_found", op, parse_uri(root), "not a directory", "pass an existing local directory")
    u = parse_uri(uri)
    return root, u, backend_for(u, settings)


def upload_dir(local_dir: str | os.PathLike, uri: URILike, *, settings: StorageSettings | None = None) -> list[str]:
    """Upload every file under ``local_dir`` to ``uri``/relative path (no manifest; not atomic for readers).

    Use ``publish_dir`` for stage outputs that others read. Returns the object URIs.
    """
    root, u, be = _source_and_target("upload_dir", local_dir, uri, settings)
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
    root, u, be = _source_and_target("publish_dir", local_dir, uri, settings)
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


def _incomplete(op: str, u: StorageURI, what: str, be: Backend) -> StorageError:
    return _storage_error("incomplete", op, u, what, _INCOMPLETE_FIX, be.endpoint())


def _read_manifest_bytes(u: StorageURI, be: Backend) -> bytes | None:
    mu = u.join(MANIFEST_NAME)
    try:
        return be.run("read", mu, lambda: be.get_bytes(mu))
    except StorageError as e:
        if getattr(e, "kind", "") == "not_found":
            return None
        raise


def _entries(raw: bytes, u: StorageURI, be: Backend) -> list[dict[str, Any]]:
    try:
        return _parse_manifest(raw, str(u.join(MANIFEST_NAME)))
    except _Incomplete as exc:
        raise _incomplete("download_dir", u, str(exc), be) from exc


def read_manifest(uri: URILike, *, settings: StorageSettings | None = None) -> list[dict[str, Any]] | None:
    """The file entries (path, size, sha256) of the manifest under ``uri``; None when there is none.

    Raises ``StorageError`` (kind ``incomplete``) when the manifest is malformed.
    """
    u = parse_uri(uri)
    be = backend_for(u, settings)
    raw = _read_manifest_bytes(u, be)
    return None if raw is None else _entries(raw, u, be)


_Plan = list[tuple[str, int, "str | None"]]


def _dir_plan(u: StorageURI, be: Backend, verify: bool) -> tuple[list[dict[str, Any]] | None, _Plan, str]:
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


def _download_plan(u: StorageURI, be: Backend, entries: list[dict[str, Any]] | None, plan: _Plan, dest: Path,
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
    be = backend_for(u, settings)
    entries, plan, _token = _dir_plan(u, be, verify)
    _download_plan(u, be, entries, plan, dest, replace_existing=True)
    log.info("downloaded %s -> %s (%d files)", u, dest, len(plan))
    return dest
