"""The GPU worker: load the models once, then run a shard's cases, learning each image once.

For each group of a shard (cases sharing an image and a source prompt) the worker skips the cases already published
under ``<output_uri>/<id>/`` (so a re-run resumes), learns the image once (prompt tuning + LoRA, optionally through a
learned-state cache folder), and runs each remaining edit from the learned state with ``run_edit`` — the same pixels
as a one-shot ``editinfinity edit`` of the case. Every case ends with a status record in
``<output_uri>/_status/<id>.json`` (done or failed, with the error); a bad case never stops the worker. Results are
published as each case finishes.

A pod with several GPUs runs one worker process per GPU (:func:`run_processes`): the shard is split again into one
part per process, each process loads its own models on its own device and publishes on its own; nothing is shared
between them but the output store.

A worker killed outright (SIGKILL, out of memory) cannot clean up: the next worker on the same host into a local
results folder removes what it left there (:func:`clean_leftovers`), recognised by the private names that record
their process (``.NAME.editinfinity-tmp-HOST-PID-XXXXXX``), and only when that process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from ..errors import EditInfinityError
from ..runtime import resolve_weights
from ..scratch import make_scratch, scratch_dir
from ..storage.base import current_umask
from .plan import BatchPlan, case_settings, read_plan, split

log = logging.getLogger(__name__)

STATUS_DIR = "_status"


def case_uri(plan: BatchPlan, case: dict) -> str:
    return case.get("output_uri") or f"{plan.output_uri.rstrip('/')}/{case['id']}"


def status_uri(output_uri: str, case_id: str) -> str:
    return f"{output_uri.rstrip('/')}/{STATUS_DIR}/{case_id}.json"


def clean_leftovers(plan: BatchPlan) -> None:
    """Remove what killed processes of this host left in the plan's local results folders (the root, its status
    folder, the folders of cases with their own output URI): storage's private files and folders whose process is
    gone (:func:`editinfinity.outputs.remove_stale`). Remote results need nothing: an unfinished upload is never
    visible without its manifest."""
    from ..outputs import remove_stale
    from ..storage import parse_uri

    uris = [plan.output_uri, status_uri(plan.output_uri, "x"), *(case_uri(plan, c) for c in plan.cases)]
    folders = {Path(parse_uri(u).key).parent for u in uris if not parse_uri(u).is_remote}
    for folder in sorted(folders):
        if folder.is_dir():
            remove_stale(folder)


def is_done(plan: BatchPlan, case: dict) -> bool:
    """A case is done when its folder was published completely (the manifest is written last)."""
    from .. import storage

    return storage.exists(f"{case_uri(plan, case).rstrip('/')}/{storage.MANIFEST_NAME}")


def write_status(plan: BatchPlan, status: dict) -> None:
    from .. import storage

    storage.write_bytes(status_uri(plan.output_uri, status["id"]),
                        (json.dumps(status, indent=1, sort_keys=True, default=str) + "\n").encode())


def read_status(output_uri: str, case_id: str) -> dict | None:
    from .. import storage

    uri = status_uri(output_uri, case_id)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri).decode())
    except (json.JSONDecodeError, EditInfinityError):
        return None


def _error_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if isinstance(exc, EditInfinityError) else f"{exc.__class__.__name__}: {text}"


def _spec(case: dict) -> dict:
    return {k: case.get(k, "") for k in ("mode", "prompt", "edit_prompt", "target_word")}


class Worker:
    """Models loaded once for a plan's settings; :meth:`run` processes groups of cases."""

    def __init__(self, plan: BatchPlan, *, device: str | None = None, models=None, learned_cache=None,
                 local_weights=None, name: str = "worker", progress: bool = False):
        from ..edit.settings import EditSettings

        self.plan, self.name, self.progress = plan, name, progress
        self.settings = EditSettings.from_dict(plan.settings)
        self.learned_cache = learned_cache
        t = time.perf_counter()
        loaded_here = models is None
        if models is None:
            from ..models.bundle import load_models

            weights = resolve_weights(plan.weights)
            if weights and local_weights:
                weights = str(copy_weights(weights, local_weights))
            models = load_models(plan.preset or None, weights=weights, device=device,
                                 bias_mode=self.settings.bias_mode)
        self.models = models
        #: Seconds this worker spent loading the models (None: given loaded); the first case it edits records them.
        self.load_seconds = time.perf_counter() - t if loaded_here else None
        self._load_reported = False

    def run(self, groups: list[dict]) -> list[dict]:
        """Process ``groups``; returns one status per case (also written under ``_status/``)."""
        statuses = []
        for group in groups:
            statuses += self.run_group(group)
        return statuses

    def run_group(self, group: dict) -> list[dict]:
        plan = self.plan
        todo, statuses = [], []
        for case in group["cases"]:
            if is_done(plan, case):
                previous = read_status(plan.output_uri, case["id"]) or {}
                statuses.append({**previous, "id": case["id"], "status": "done", "resumed": True,
                                 "output_uri": case_uri(plan, case)})
            else:
                todo.append(case)
        if not todo:
            return statuses
        t = time.perf_counter()
        try:
            state = self.learn(group)
        except Exception as exc:  # the whole group fails, the worker goes on
            log.error("learning %s failed: %s", group["image"], _error_line(exc))
            log.debug("%s", traceback.format_exc())
            self._free()
            for case in todo:
                status = {"id": case["id"], "status": "failed", "error": f"learn: {_error_line(exc)}",
                          "spec": _spec(case), "worker": self.name}
                write_status(plan, status)
                statuses.append(status)
            return statuses
        learn_seconds = time.perf_counter() - t
        for i, case in enumerate(todo):
            statuses.append(self.run_case(case, state, learn_seconds if i == 0 else 0.0))
        return statuses

    def learn(self, group: dict):
        from .. import storage
        from ..edit.learned import cached_learn, learn

        image = str(storage.cached_path(group["image"]))
        settings = case_settings(self.settings, group)  # the group's learning settings
        kw = {"resolution": self.plan.resolution or None, "settings": settings, "progress": self.progress}
        if self.learned_cache:
            state, _ = cached_learn(self.learned_cache, self.models, image, group["prompt"], **kw)
        else:
            state = learn(self.models, image, group["prompt"], **kw)
        state.image = group["image"]
        return state

    def run_case(self, case: dict, state, learn_seconds: float = 0.0) -> dict:
        """One edit from learned state, published to the case's URI; never raises for a bad case."""
        from .. import storage
        from ..edit.run import run_edit

        plan = self.plan
        uri = case_uri(plan, case)
        t = time.perf_counter()
        status = {"id": case["id"], "spec": _spec(case), "worker": self.name, "learned": state.key}
        try:
            mask = str(storage.cached_path(case["mask"])) if case.get("mask") else None
            with scratch_dir("editinfinity-case") as tmp:
                out = Path(tmp) / "out"
                run_edit(out, edit_prompt=case["edit_prompt"], mode=case["mode"],
                         target_word=case.get("target_word") or None, mask=mask, mask_polarity=plan.mask_polarity,
                         models=self.models, settings=case_settings(self.settings, case), progress=self.progress,
                         learned=state)
                summary = json.loads((out / "summary.json").read_text())
                storage.publish_dir(out, uri)
            status.update(status="done", output_uri=uri, metrics=summary.get("metrics", {}),
                          seconds=case_seconds(summary.get("seconds", {}), learn_seconds, time.perf_counter() - t,
                                               None if self._load_reported else self.load_seconds))
            self._load_reported = True
        except Exception as exc:  # one bad case never stops the worker
            log.error("case %s failed: %s", case["id"], _error_line(exc))
            log.debug("%s", traceback.format_exc())
            self._free()
            status.update(status="failed", error=_error_line(exc))
        write_status(plan, status)
        log.info("case %s %s (%.1f s)", case["id"], status["status"], time.perf_counter() - t)
        return status

    def _free(self) -> None:
        """After a failure (an out-of-memory error among them), give cached GPU memory back before going on."""
        import torch

        if self.models.device.type == "cuda":
            torch.cuda.empty_cache()


def case_seconds(edit_seconds: dict, learn_seconds: float, case_seconds: float,
                 load_seconds: float | None = None) -> dict:
    """A case status's ``seconds``: the edit's summary timings (edit.sequence's keys), ``load_models`` for the
    worker's first case when the worker loaded the models, ``learn`` for the case that paid for learning its image
    (as ``run_edit`` with a learned-state cache records both) and ``case``, the case's wall time (edit and
    publishing; loading and learning left out)."""
    paid = {"load_models": round(load_seconds, 4)} if load_seconds is not None else {}
    if learn_seconds:
        paid["learn"] = round(learn_seconds, 4)
    return {**paid, **edit_seconds, "case": round(case_seconds, 4)}


def copy_weights(weights: str, local_dir) -> Path:
    """Copy a weights directory once to node-local disk (``local_dir/<name>``, published by one rename, so
    concurrent workers of a pod copy it once and never read a half-copied folder); returns the copy."""
    import shutil

    src = Path(weights)
    if not src.is_dir():
        return src  # a hub id or a file: nothing to copy
    dest = Path(local_dir) / src.name
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_scratch(src.name, dir=dest.parent)  # a copy a killed worker left is removed here (scratch.py)
    try:
        t = time.perf_counter()
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        os.chmod(tmp, 0o777 & ~current_umask())  # make_scratch made it 0700
        try:
            os.rename(tmp, dest)
        except OSError:  # another worker's copy won
            if not dest.is_dir():
                raise
        log.info("weights copied to %s (%.1f s)", dest, time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def run_shard(plan: BatchPlan, shard: int, *, device: str | None = None, part: tuple[int, int] = (0, 1),
              learned_cache=None, local_weights=None, progress: bool = False) -> list[dict]:
    """Run part ``part[0]`` of ``part[1]`` of ``shard`` in this process."""
    clean_leftovers(plan)
    groups = plan.shard_groups(shard)
    index, parts = part
    if parts > 1:
        pieces = split(groups, parts)
        groups = [groups[g] for g in pieces[index]] if index < len(pieces) else []
    if not groups:
        return []
    worker = Worker(plan, device=device, learned_cache=learned_cache, local_weights=local_weights,
                    name=f"shard{shard}.{index}", progress=progress)
    return worker.run(groups)


def run_processes(plan_path, shard: int, devices: list[str], *, learned_cache=None, local_weights=None,
                  log_dir=None) -> list[dict]:
    """One worker process per entry of ``devices`` (``cuda:0,cuda:1``; a device may repeat), each over its part of
    ``shard``; waits for all and returns every case's status (read back from ``_status/``; a process that died
    leaves its cases without one: they are reported ``failed`` with the process's exit code)."""
    plan = read_plan(plan_path)
    weights = resolve_weights(plan.weights)
    if weights and local_weights:
        copy_weights(weights, local_weights)  # once, before the processes look for it
    procs = []
    for i, dev in enumerate(devices):
        cmd = [sys.executable, "-m", "editinfinity.cli", "-q", "batch", "work", "--plan", str(plan_path), "--shard",
               str(shard), "--part", f"{i}/{len(devices)}", "--device", dev]
        if learned_cache:
            cmd += ["--learned-cache", str(learned_cache)]
        if local_weights:
            cmd += ["--local-weights", str(local_weights)]
        out = open(Path(log_dir) / f"worker-{shard}-{i}.log", "w") if log_dir else None  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"}), out))
    codes = []
    for p, out in procs:
        codes.append(p.wait())
        if out:
            out.close()
    statuses = []
    for case in (c for g in plan.shard_groups(shard) for c in g["cases"]):
        status = read_status(plan.output_uri, case["id"])
        if status is None or (status.get("status") != "done" and is_done(plan, case)):
            status = ({"id": case["id"], "status": "done", "output_uri": case_uri(plan, case)}
                      if is_done(plan, case) else
                      {"id": case["id"], "status": "failed", "spec": _spec(case),
                       "error": f"worker process exited with {codes} before this case"})
        statuses.append(status)
    return statuses
