"""What a pipeline pod needs from the library, with no Kubeflow in it: fetch by URI, load the model bundle once,
stage metadata, skipped stages, timings, the fused run's hand-over, the per-case summary and publishing.

The KFP components (top-level ``components/``) import this module inside their bodies
(``from editinfinity import runtime as rt``), so they stay a few lines over one stage function. Artifacts are
duck-typed: anything with ``.path`` and ``.metadata`` (a kfp ``Artifact`` in a pod).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .scratch import scratch_dir
from .storage.uri import file_uri_path, has_scheme

if TYPE_CHECKING:
    from .edit.settings import EditSettings
    from .models.bundle import ModelBundle

STAGE_FILE = "stage.json"
SKIPPED_FILE = "skipped.json"


def fetch(uri: str, dest_dir: str | os.PathLike) -> str:
    """Download one object (or copy a local file) into ``dest_dir``, keeping its name; returns the local path."""
    from . import storage

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    return str(storage.download(uri, dest))


def resolve_weights(weights: str) -> str | None:
    """A local weights location for ``load_models``: "" -> None (the preset's own); a gs:// / s3:// URI is fetched
    once into ``$EDITINFINITY_CACHE`` (shared by every pod that mounts the model-cache volume); anything else (a
    directory, a hub id) is passed through."""
    if not weights:
        return None
    weights = file_uri_path(weights)
    if has_scheme(weights):
        from . import storage

        return str(storage.cached_path(weights))
    return weights


def load_models(preset: str, weights: str, *, text_encoder: bool = True) -> ModelBundle:
    """Load the model bundle once for this pod (preset "" means the default preset); the stages after prepare pass
    ``text_encoder=False`` (they read the prompts' features from the case artifact)."""
    from .models.bundle import load_models as _load

    return _load(preset or None, weights=resolve_weights(weights), text_encoder=text_encoder)


#: The pipelines' ``threshold`` when none is given: any negative number means "the preset's" (``None`` in
#: ``EditSettings``). A number, not an optional parameter: kfp.local (2.17) cannot run a pipeline whose optional
#: parameter is left unset, and KFP backends before kubeflow/pipelines#11788 fail the tasks it is passed to.
UNSET_THRESHOLD = -1.0


def mask_threshold(value: float | None) -> float | None:
    """A pipeline's ``threshold`` parameter as ``EditSettings.threshold``: negative (``UNSET_THRESHOLD``) or None ->
    None (the preset's); a number in [0, 1] as given (others are refused by the settings' validation)."""
    return None if value is None or value < 0 else float(value)


def edit_settings(*, prompt_iters: int, lora_iters: int, seed: int, threshold: float | None = None) -> EditSettings:
    """The method's settings (default profile) with the pipeline's overrides (``threshold``: see
    :func:`mask_threshold`)."""
    from .edit.settings import EditSettings

    return EditSettings.from_profile("default", prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed,
                                     threshold=mask_threshold(threshold))


def stage_metadata(stage_dir: str | os.PathLike, **extra: Any) -> dict:
    """Artifact metadata from a stage folder's ``stage.json``: stage, run id, version, seconds (+ ``extra``)."""
    path = Path(stage_dir) / STAGE_FILE
    meta: dict[str, Any] = {}
    if path.is_file():
        rec = json.loads(path.read_text())
        meta = {k: rec[k] for k in ("stage", "run_id", "editinfinity_version", "seconds") if k in rec}
    meta.update(extra)
    return meta


def mark_skipped(path: str | os.PathLike, reason: str) -> None:
    """Make an (empty) output folder for a stage the case's mode skips, saying why."""
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / SKIPPED_FILE).write_text(json.dumps({"skipped": True, "reason": reason}) + "\n")


def optional_dir(artifact: Any) -> str | None:
    """The folder of an optional input artifact, or None when it is absent or marks a skipped stage."""
    if artifact is None:
        return None
    path = Path(artifact.path)
    if not path.is_dir() or ((path / SKIPPED_FILE).is_file() and not (path / STAGE_FILE).is_file()):
        return None
    return str(path)


def collect_timings(*artifacts: Any) -> dict[str, float]:
    """Seconds per stage from artifacts' metadata (their own ``stage``/``seconds`` and any carried ``timings``)."""
    timings: dict[str, float] = {}
    for art in artifacts:
        if art is None:
            continue
        meta = art.metadata or {}
        for name, value in (meta.get("timings") or {}).items():
            if isinstance(value, (int, float)):
                timings[name] = float(value)
        if "stage" in meta and isinstance(meta.get("seconds"), (int, float)):
            timings[str(meta["stage"])] = float(meta["seconds"])
    return timings


def split_fused_run(work: str | os.PathLike, outputs: Mapping[str, Any]) -> None:
    """Hand ``run_edit``'s stage folders (``work/stages/<name>``) over to the output artifacts.

    A stage the mode skipped gets a ``skipped.json`` folder; the generate output's metadata carries every timing of
    the run (``summary.json`` ``seconds``, model loading included). ``work``'s parent (a temp folder) is removed.
    """
    work = Path(work)
    timings: dict[str, float] = {}
    summary = work / "summary.json"
    if summary.is_file():
        timings = {k: float(v) for k, v in json.loads(summary.read_text()).get("seconds", {}).items()
                   if isinstance(v, (int, float))}
    for name, art in outputs.items():
        src, dest = work / "stages" / name, Path(art.path)
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (src / STAGE_FILE).is_file():
            shutil.move(str(src), str(dest))
            art.metadata.update(stage_metadata(dest))
        else:
            mark_skipped(dest, f"the {name} stage does not run in this mode")
            art.metadata["skipped"] = True
    if "generate" in outputs:
        outputs["generate"].metadata["timings"] = timings
    shutil.rmtree(work.parent, ignore_errors=True)


def _numbers(d: Mapping[str, Any] | None) -> dict[str, float]:
    return {str(k): float(v) for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _metric_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def summary_metrics(summary: Mapping[str, Any], timings: Mapping[str, float] | None = None) -> dict[str, float]:
    """Numeric figures for the KFP Metrics view: quality metrics, ``seconds_<stage>`` (``edit.sequence`` keys and
    ``seconds_total``) and ``peak_gpu_memory_gb``."""
    from .edit.sequence import PEAK_MEMORY

    out = {_metric_name(k): v for k, v in _numbers(summary.get("metrics")).items()}
    seconds = {**_numbers(summary.get("seconds")), **_numbers(timings)}
    out.update({k if k == PEAK_MEMORY else f"seconds_{_metric_name(k)}": v for k, v in seconds.items()})
    return dict(sorted(out.items()))


def summary_markdown(summary: Mapping[str, Any], *, output_uri: str = "", case_id: str = "") -> str:
    """A short Markdown report: the case, quality metrics, timings and where the results were published."""
    from .edit.sequence import PEAK_MEMORY

    spec = summary.get("spec") or {}
    lines = [f"# EditInfinity edit{f' `{case_id}`' if case_id else ''}", "", "| | |", "|---|---|"]
    for key in ("mode", "prompt", "edit_prompt", "target_word", "resolution"):
        if spec.get(key):
            lines.append(f"| {key.replace('_', ' ')} | {str(spec[key]).replace('|', '/')} |")
    if summary.get("preset"):
        lines.append(f"| preset | {summary['preset']} |")
    metrics = _numbers(summary.get("metrics"))
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    seconds = _numbers(summary.get("seconds"))
    peak = seconds.pop(PEAK_MEMORY, None)
    if seconds:
        lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    if peak is not None:
        lines += ["", f"Peak GPU memory: {peak:.1f} GiB"]
    lines += ["", f"Results: `{output_uri}`" if output_uri else "Results: in the pipeline root (no output_uri)."]
    return "\n".join(lines) + "\n"


def publish_edit(output_uri: str, summary_dir: str | os.PathLike, *, edited: str | os.PathLike,
                 mask: str | os.PathLike | None = None, attention: str | os.PathLike | None = None) -> str:
    """Publish one edit to ``output_uri`` in ``editinfinity edit``'s layout; returns the URI ("" when none given).

    Top level: the summary folder (``report.html``, ``summary.json``, ``edited.png``, ...); ``stages/generate``,
    ``stages/mask``, ``stages/attention``: the stage folders, for inspection or resuming.
    """
    if not output_uri:
        return ""
    from . import storage

    with scratch_dir("editinfinity-publish") as tmp:
        staging = Path(tmp) / "out"
        shutil.copytree(summary_dir, staging)
        for name, src in (("generate", edited), ("mask", mask), ("attention", attention)):
            if src is not None:
                shutil.copytree(src, staging / "stages" / name)
        storage.publish_dir(staging, output_uri)
    return output_uri


def case_result(case_id: str, output_uri: str, summary: Mapping[str, Any]) -> str:
    """The compact JSON one case hands to the batch summary (a pipeline parameter, so kept small)."""
    spec = summary.get("spec") or {}
    return json.dumps({"case_id": case_id, "output_uri": output_uri,
                       "spec": {k: spec.get(k) for k in ("mode", "prompt", "edit_prompt", "target_word")},
                       "metrics": _numbers(summary.get("metrics")), "seconds": _numbers(summary.get("seconds"))},
                      sort_keys=True)



def case_content_key(*, image_uri: str, prompt: str, edit_prompt: str, mode: str, target_word: str, mask_uri: str,
                     mask_polarity: str, resolution: str, preset: str, weights: str, settings: Mapping[str, Any]) -> str:
    """Validate one edit's inputs on the CPU (as the batch plan does: image readable and large enough, target word in
    the prompt, mask readable, mode consistent; InvalidCaseError otherwise) and return a key of their content: the
    image's pixel digest, the mask file's sha256, the prompts, the mode's fields and the settings. Given to a cached
    step as a parameter, it makes KFP's cache hit when the same content comes again (under any URI) and miss when
    the content behind a URI changed.

    ``settings`` are keyed as given: an unset threshold stays ``None``, never the preset's value it resolves to.
    This CPU step cannot know for sure which preset the GPU pods load (``preset`` "" is whatever default their
    image has), so keying on a resolved value could let an unset threshold and an explicit 0.5 share a key while
    their masks differ; keyed as given they never do (the preset name is in the key too). An unset threshold and
    an explicit equal value miss each other's cache, which costs a re-run, not a wrong result; a preset default
    changed by a later release comes with new images, which KFP's cache keys on already."""
    import hashlib

    from . import storage
    from .batch.plan import check_case, default_resolution

    case = {"id": "case", "image": image_uri, "prompt": prompt, "edit_prompt": edit_prompt, "mode": mode,
            "target_word": target_word, "mask": mask_uri}
    digest = check_case(case, resolution=resolution or default_resolution(preset), mask_polarity=mask_polarity)
    mask_digest = storage.sha256_file(storage.cached_path(mask_uri)) if mask_uri and mode == "mask" else ""
    record = {"image": digest, "mask": mask_digest, "prompt": prompt, "edit_prompt": edit_prompt, "mode": mode,
              "target_word": target_word, "mask_polarity": mask_polarity, "resolution": resolution,
              "preset": preset, "weights": weights, "settings": dict(settings)}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]
