"""Remote ``--out`` targets (``gs://``, ``s3://``): what :func:`editinfinity.outputs.claim_output` checks and claims.

Object stores have no rename and no ``flock``, so a remote target is claimed with one object instead:

* **Checked before any work**: a listing (credentials, bucket), an existing result (needs ``--overwrite``; objects
  not written by editinfinity are never replaced) and write access (a probe object, written and deleted).
* **One writer per prefix**: the run creates ``PREFIX/.editinfinity-claim.json`` (pid, host, process start time, a
  random token) with a conditional create that the store decides atomically (S3 ``If-None-Match: *``, GCS
  ``ifGenerationMatch=0``: :func:`editinfinity.storage.create_bytes`). A second run into the same prefix fails at
  once naming the first one; readers never see the claim (a result is what its ``_MANIFEST.json`` lists).
* **Publish** (:func:`editinfinity.storage.publish_dir`: every file, then the manifest) from a local private folder,
  then the claim is removed, on success or failure alike (SIGINT / SIGTERM included).
* **A killed run's claim**: a claim made on this host by a process that is gone is removed by the next run; one
  made on another host is reported with the object to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time

from .errors import OutputError
from .storage.base import host_name, process_alive, process_start_time

log = logging.getLogger(__name__)

#: The claim object a run creates under a remote ``--out`` while it works.
CLAIM_NAME = ".editinfinity-claim.json"
CLAIM_FORMAT = "editinfinity-claim/1"


def check_remote_output(u, *, overwrite: bool, flag: str = "--out", ours: set[str] = frozenset()) -> None:
    """Credentials, bucket, an existing result and write access of a ``gs://`` / ``s3://`` target, checked with
    a listing and a probe object (written and deleted) before any work. A prefix holding the manifest or one of
    the names ``ours`` holds a result of ours (``--overwrite`` may replace it); anything else is someone else's."""
    from . import storage

    objs = storage.list_objects(u)  # fails on missing credentials, a missing bucket, an unreachable endpoint
    names = {o.rel for o in objs} - {CLAIM_NAME}
    if names:
        if not names & {storage.MANIFEST_NAME, *ours}:
            raise OutputError(f"{flag} {u} already holds {len(names)} object(s) not written by editinfinity; "
                              f"choose another {flag}")
        if not overwrite:
            raise OutputError(f"{flag} {u} already holds a result; pass --overwrite to replace it or choose "
                              f"another {flag}")
    probe = u.join(f".editinfinity-write-probe-{host_name()}-{os.getpid()}")
    storage.write_bytes(probe, b"")
    storage.delete(probe)


def _read_claim(uri) -> dict | None:
    from . import storage
    from .errors import StorageError

    try:
        data = json.loads(storage.read_bytes(uri))
    except StorageError as exc:
        if getattr(exc, "kind", "") == "not_found":
            return None
        raise
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def claim_remote(u, *, flag: str = "--out") -> str:
    """Create ``u``'s claim object, or fail naming the run that holds it; returns this run's token."""
    from . import storage

    uri = u.join(CLAIM_NAME)
    token = secrets.token_hex(8)
    body = {"format": CLAIM_FORMAT, "pid": os.getpid(), "host": host_name(), "start": process_start_time(os.getpid()),
            "token": token, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(3):
        if storage.create_bytes(uri, json.dumps(body).encode()):
            return token
        holder = _read_claim(uri)
        if holder is None:  # released between our create and our read: try again
            continue
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and host == host_name() and not process_alive(pid, holder.get("start")):
            log.warning("removing %s, left by pid %d on %s, which is gone", uri, pid, host)
            storage.delete(uri)
            continue
        who = f"pid {pid} on {host}, since {holder.get('created')}" if pid else "unknown"
        raise OutputError(f"another editinfinity run ({who}) is writing {flag} {u}; wait for it to finish or "
                          f"choose another {flag} (if that run is gone, delete {uri})")
    raise OutputError(f"could not claim {flag} {u}: its claim object {uri} keeps changing (other runs are starting "
                      f"there); choose another {flag}")


def release_remote(u, token: str) -> None:
    """Remove ``u``'s claim object if it is still this run's (``token``)."""
    from . import storage

    uri = u.join(CLAIM_NAME)
    try:
        holder = _read_claim(uri)
        if holder is not None and holder.get("token") == token:
            storage.delete(uri)
    except Exception as exc:  # the run's own outcome matters more than a claim left behind
        log.warning("could not remove the claim %s (%s); delete it before the next run into this --out", uri, exc)
