"""What killed runs leave behind, found and removed: private folders and files named by
:func:`editinfinity.storage.base.private_path` (the host and pid that made them are in the name) and earlier results
moved aside by ``--overwrite``. Below both :mod:`editinfinity.outputs` (results) and :mod:`editinfinity.scratch`
(temporary folders), which share it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .storage.base import _NAME_MAX, LEFTOVER, host_name, process_alive

__all__ = ["RUN_MARKER", "Leftover", "stale_folders", "remove_stale"]

log = logging.getLogger("editinfinity.outputs")
#: Marker inside a private folder while its run is working.
RUN_MARKER = ".editinfinity-run.json"
_host, _alive = host_name, process_alive


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Leftover:
    path: Path
    kind: str  # "tmp" (a private folder) or "old" (an earlier result moved aside by --overwrite)
    host: str
    pid: int
    target: Path
    state: str  # "stale" (its process is gone), "running", or "other-host" (cannot tell from here)


def stale_folders(folder, name: str | None = None) -> list[Leftover]:
    """Private and moved-aside folders and files in ``folder`` (for target ``name`` only, when given): the ones named
    by :func:`editinfinity.storage.base.private_path` (result folders, plan and report files, storage's local
    atomic writes and published folders), which record the host and pid that made them."""
    folder = Path(folder)
    found = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for p in entries:
        m = LEFTOVER.match(p.name)
        if not m or p.is_symlink() or not (p.is_dir() or p.is_file()):
            continue
        marker = (_json(p / RUN_MARKER) if p.is_dir() else None) or {}
        target = Path(marker.get("target") or folder / m["name"])
        if name is not None and (target.name != name if marker.get("target") else m["name"] != name[:_NAME_MAX]):
            continue
        pid, host = int(m["pid"]), m["host"]
        if host != _host():
            state = "other-host"
        else:
            state = "running" if _alive(pid, marker.get("start")) else "stale"
        found.append(Leftover(p, "tmp" if m["kind"].endswith("tmp") else "old", host, pid, target, state))
    return found


def _remove_leftover(item: Leftover) -> str:
    if item.kind == "old" and not os.path.lexists(item.target):
        # killed between moving the earlier result aside and renaming the new one in: put it back
        os.rename(item.path, item.target)
        return f"restored {item.target} (moved aside by pid {item.pid}, which was killed)"
    if item.path.is_dir():
        shutil.rmtree(item.path)
    else:
        item.path.unlink()
    return f"removed {item.path} (left by pid {item.pid} on {item.host}, which is gone)"


def remove_stale(folder, name: str | None = None) -> None:
    """Remove what killed runs of this host left in ``folder`` (for target ``name`` only, when given): private
    folders and files whose process is gone (see :func:`stale_folders`); a warning names each. Nothing else is
    touched: a running process's, another host's, or a name we did not make."""
    for item in stale_folders(folder, name):
        if item.state == "stale":
            try:
                log.warning("%s", _remove_leftover(item))
            except OSError as exc:
                log.warning("could not remove %s (%s)", item.path, exc)
