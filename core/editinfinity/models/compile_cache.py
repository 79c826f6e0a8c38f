"""Persistent ``torch.compile`` caches, so that a fresh process reuses what an earlier one compiled.

``torch.compile`` keeps compiled graphs (Inductor's FX-graph cache, the AOTAutograd cache) and Triton kernels under
Inductor's cache folder, ``TORCHINDUCTOR_CACHE_DIR`` (by default a folder under /tmp that a pod loses).
:func:`prepare_compile_cache` points that folder at ``$EDITINFINITY_CACHE/torch-compile`` (the model-cache volume in
the pipeline's pods, ``~/.cache/editinfinity`` locally) unless the variable is already set, and loads every portable
cache file (``mega-*.bin``, ``torch.compiler.load_cache_artifacts``) found there. :func:`save_compile_cache` writes
such a file after a process compiled something new (``torch.compiler.save_cache_artifacts``): one file holds every
compiled graph and kernel of that process, so copying it into an image or onto a fresh volume starts pods warm.
With a warm cache a process still traces the model (seconds), but compiles no kernel.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: Folder under the editinfinity cache root.
SUBDIR = "torch-compile"
#: Portable cache files: ``mega-<torch version>-<hash>.bin``.
MEGA_PREFIX = "mega-"

_state: dict = {"prepared": False, "loaded": [], "misses_saved": 0, "file": None}


def compile_cache_dir() -> Path:
    """Inductor's cache folder: ``TORCHINDUCTOR_CACHE_DIR`` when set, else ``<editinfinity cache>/torch-compile``."""
    from ..storage.cache import cache_root

    found = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(found) if found else cache_root() / SUBDIR


def _torch_tag() -> str:
    import torch

    return "".join(c if c.isalnum() or c in "._" else "_" for c in torch.__version__)


def prepare_compile_cache() -> Path | None:
    """Point Inductor at the persistent folder and load the portable cache files there (once per process).

    Returns the folder, or None when it cannot be created (then torch keeps its default and nothing is loaded).
    """
    if _state["prepared"]:
        return compile_cache_dir()
    _state["prepared"] = True
    directory = compile_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compile cache folder %s not usable (%s); compiling without a persistent cache", directory, exc)
        return None
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(directory))
    import torch

    for path in sorted(directory.glob(f"{MEGA_PREFIX}{_torch_tag()}-*.bin")):
        try:
            info = torch.compiler.load_cache_artifacts(path.read_bytes())  # None: unreadable (torch logs why)
        except Exception as exc:  # a file of another build or a truncated copy: compile instead
            log.warning("skipping compile cache file %s: %s", path, exc)
            info = None
        if info is not None:
            _state["loaded"].append(path.name)
    log.info("compile cache %s (%d portable files loaded)", directory, len(_state["loaded"]))
    return directory


def save_compile_cache() -> Path | None:
    """Write what this process compiled into one portable file in the cache folder (atomically).

    Does nothing when nothing was compiled since the last call (cache hits only: the folder already has it).
    A process keeps one file and rewrites it as it compiles more. Returns the file written, else None.
    """
    import torch

    stats = compile_cache_stats()
    misses = stats["fxgraph_cache_miss"] + stats["autograd_cache_miss"]
    if misses == _state["misses_saved"]:  # nothing compiled since the last file (or ever): the folder has it all
        return None
    try:
        found = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # never fail an edit for a cache
        log.warning("could not collect the compile cache: %s", exc)
        return None
    if not found or not found[0]:
        return None
    data = found[0]
    _state["misses_saved"] = misses
    directory = compile_cache_dir()
    # One file per process, rewritten with everything it compiled so far (each save is a superset of the last).
    path = _state.get("file") or directory / f"{MEGA_PREFIX}{_torch_tag()}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the compile cache file %s: %s", path, exc)
        return None
    _state["file"] = path
    log.info("compile cache file %s written (%.1f MB)", path, len(data) / 2**20)
    return path


def compile_cache_stats() -> dict:
    """Hits and misses of the FX-graph and AOTAutograd caches in this process, the portable files loaded, and the
    graphs Dynamo captured (``unique_graphs``) and the graph breaks it hit (both should stay small)."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {"folder": str(compile_cache_dir()), "portable_files_loaded": list(_state["loaded"]),
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_break": int(sum(counters["graph_break"].values())),
            "fxgraph_cache_hit": int(ind.get("fxgraph_cache_hit", 0)),
            "fxgraph_cache_miss": int(ind.get("fxgraph_cache_miss", 0)),
            "autograd_cache_hit": int(aot.get("autograd_cache_hit", 0)),
            "autograd_cache_miss": int(aot.get("autograd_cache_miss", 0)),
            "autograd_cache_bypass": int(aot.get("autograd_cache_bypass", 0))}
