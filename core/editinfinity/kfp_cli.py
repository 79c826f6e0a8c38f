"""Kubeflow Pipelines glue: compile / run locally / submit, and the small helpers the components call in the pod.

CLI pieces (wired into ``editinfinity pipeline ...`` by ``add_pipeline_parser``):

* ``compile_pipeline(pipeline, profile, out_dir, fused=False)``: a deterministic KFP YAML (same bytes every time).
* ``run_local(pipeline, **params)``: the pipeline under ``kfp.local`` (SubprocessRunner, this interpreter).
* ``submit(host, experiment, package_path, params, ...)``: create a run on a KFP endpoint through ``kfp.Client``.

Component runtime helpers (``fetch``, ``load_models``, ``stage_metadata``, ``optional_dir``, ``collect_timings``,
``split_fused_run``, ``publish_edit``, ``read_manifest``, ``batch_report``, ...): imported inside component bodies
(``from editinfinity import kfp_cli as rt``), so the components stay a few lines over one stage function.

The pipeline definitions live in the top-level ``pipelines``/``components`` folders of the repository; when they
are not importable (an editable install puts only ``core/`` on the path) the repository root is added.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EditInfinityError, InvalidCaseError

if TYPE_CHECKING:
    from .edit.settings import EditSettings
    from .models.bundle import ModelBundle

if importlib.util.find_spec("kfp") is None:  # the CLI then simply has no `pipeline` command
    raise ImportError("kfp is not installed: pip install 'editinfinity[pipeline]'")

log = logging.getLogger(__name__)

PIPELINES = ("edit", "batch", "piebench")
#: Pipelines that also come in a ``fused`` variant (every GPU stage in one pod).
FUSED_PIPELINES = ("edit", "batch")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class PipelineRunError(EditInfinityError):
    """A local pipeline run failed; the message names the failing task (its log is above)."""


class SubmitError(EditInfinityError):
    """The KFP endpoint could not be reached or refused the request; the message names the host and the reply."""


# ---------------------------------------------------------------------------------------------------------------
# Building and compiling
# ---------------------------------------------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _import_pipelines():
    """The top-level ``pipelines`` package; adds the repository root to ``sys.path`` when needed."""
    try:
        import pipelines
    except ModuleNotFoundError:
        root = _repo_root()
        if not (root / "pipelines" / "edit.py").is_file():
            raise EditInfinityError(
                "the pipeline definitions (pipelines/, components/) are not importable and not next to this "
                f"install ({root}); run from a checkout of the editinfinity repository") from None
        sys.path.insert(0, str(root))
        import pipelines
    return pipelines


def build_pipeline(pipeline: str = "edit", profile: str | None = None, *, fused: bool = False,
                   profiles_files: Iterable[str | os.PathLike] | None = None, parallelism: int | None = None):
    """The pipeline object (a kfp ``GraphComponent``) for ``profile`` (None: no Kubernetes settings)."""
    if pipeline not in PIPELINES:
        raise EditInfinityError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    if fused and pipeline not in FUSED_PIPELINES:
        raise EditInfinityError(f"the {pipeline} pipeline has no fused variant (its edit step already runs every "
                                "stage in one pod); drop --fused")
    p = _import_pipelines()
    prof = p.get_profile(profile, profiles_files) if profile else None
    if pipeline == "edit":
        return p.make_edit_pipeline(prof, fused=fused)
    if pipeline == "piebench":
        return p.make_piebench_pipeline(prof, parallelism=parallelism)
    return p.make_batch_pipeline(prof, fused=fused, parallelism=parallelism)


def compile_pipeline(pipeline: str = "edit", profile: str | None = None, out_dir: str | os.PathLike = ".",
                     fused: bool = False, *, profiles_files: Iterable[str | os.PathLike] | None = None,
                     parallelism: int | None = None) -> Path:
    """Compile ``pipeline`` ("edit" | "batch") for ``profile`` into ``out_dir``; returns the YAML path.

    The file is ``<pipeline>[-fused]-<profile|local>.yaml``. Compiling twice gives identical bytes (the YAML holds
    no timestamps; the image tags come from the package version or ``EDITINFINITY_IMAGE``/``_CPU_IMAGE``).
    """
    from kfp import compiler

    graph = build_pipeline(pipeline, profile, fused=fused, profiles_files=profiles_files, parallelism=parallelism)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{pipeline}{'-fused' if fused else ''}-{profile or 'local'}.yaml"
    compiler.Compiler().compile(graph, str(path))
    log.info("compiled %s", path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Local runs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LocalRun:
    """What a local run left: the pipeline's output (parsed JSON) and where its artifacts are."""

    output: Any
    pipeline_root: Path
    run_dir: Path | None


def run_local(pipeline: str = "edit", *, pipeline_root: str | os.PathLike = "kfp-local", fused: bool = False,
              parallelism: int | None = None, **params: Any) -> LocalRun:
    """Run ``pipeline`` with ``kfp.local`` (one subprocess per task, this interpreter: ``use_venv=False``).

    Artifacts stay under ``pipeline_root`` (a local folder: kfp.local cannot write to a bucket); inputs and the
    final outputs still go through the object store by URI (``image_uri``, ``mask_uri``, ``output_uri``,
    ``manifest_uri``). ``params`` are the pipeline's parameters.
    """
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    graph = build_pipeline(pipeline, None, fused=fused, parallelism=parallelism)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    try:
        with warnings.catch_warnings():  # display names etc. are for the KFP UI; kfp.local says so per task
            warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
            # Tasks run with this interpreter on purpose (use_venv=False), not in the images named in the spec.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
            task = graph(**params)
    except RuntimeError as exc:
        raise PipelineRunError(_ANSI.sub("", str(exc))) from None
    runs = sorted(root.glob(f"{graph.name}-*"), key=lambda p: p.stat().st_mtime)
    output = None
    if pipeline == "edit":
        output = json.loads(task.output)
    return LocalRun(output=output, pipeline_root=root, run_dir=runs[-1] if runs else None)


# ---------------------------------------------------------------------------------------------------------------
# Submitting to a KFP endpoint
# ---------------------------------------------------------------------------------------------------------------


def submit(host: str, experiment: str, package_path: str | os.PathLike, params: Mapping[str, Any] | None = None,
           namespace: str | None = None, token_env: str | None = None, *, run_name: str | None = None,
           service_account: str | None = None, enable_caching: bool | None = None) -> str:
    """Create a run of the compiled ``package_path`` in ``experiment`` (created when missing); returns the run id.

    ``token_env`` names an environment variable holding a bearer token (sent as ``Authorization: Bearer``);
    ``namespace`` is the user's profile namespace on multi-user Kubeflow.
    """
    import kfp

    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise EditInfinityError(f"${token_env} is empty or unset; export the KFP bearer token in it "
                                    "(or drop --token-env for an endpoint without authentication)")
    if not Path(package_path).is_file():
        raise EditInfinityError(f"pipeline package {package_path} does not exist; run `editinfinity pipeline compile`")
    import kfp_server_api
    import urllib3

    client_kwargs: dict[str, Any] = {"host": host, "existing_token": token}
    if namespace:
        client_kwargs["namespace"] = namespace
    try:
        client = kfp.Client(**client_kwargs)
        result = client.create_run_from_pipeline_package(
            str(package_path), arguments=dict(params or {}), run_name=run_name, experiment_name=experiment,
            namespace=namespace, enable_caching=enable_caching, service_account=service_account)
    except kfp_server_api.ApiException as exc:
        hint = " (check the token and --namespace)" if exc.status in (401, 403) else ""
        raise SubmitError(f"KFP endpoint {host} answered {exc.status} {exc.reason}{hint}: {exc.body}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise SubmitError(f"cannot reach the KFP endpoint {host}: {exc.__class__.__name__}; check --host "
                          "(e.g. https://kubeflow.example.com/pipeline) and the network") from None
    log.info("submitted run %s to %s (experiment %s)", result.run_id, host, experiment)
    return result.run_id


# ---------------------------------------------------------------------------------------------------------------
# Component runtime helpers (run inside the pods)
# ---------------------------------------------------------------------------------------------------------------

STAGE_FILE = "stage.json"
SKIPPED_FILE = "skipped.json"


def _has_scheme(uri: str) -> bool:
    return "://" in uri


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
    if weights.startswith("file://"):
        return weights[len("file://"):]
    if _has_scheme(weights):
        from . import storage

        return str(storage.cached_path(weights))
    return weights


def load_models(preset: str, weights: str, *, text_encoder: bool = True) -> ModelBundle:
    """Load the model bundle once for this pod (preset "" means the default preset); the stages after prepare pass
    ``text_encoder=False`` (they read the prompts' features from the case artifact)."""
    from .models.bundle import load_models as _load

    return _load(preset or None, weights=resolve_weights(weights), text_encoder=text_encoder)


def edit_settings(*, prompt_iters: int, lora_iters: int, seed: int, threshold: float) -> EditSettings:
    """The method's settings (default profile) with the pipeline's overrides."""
    from .edit.settings import EditSettings

    return EditSettings.from_profile("default", prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed,
                                     threshold=threshold)


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
    """Numeric figures for the KFP Metrics view: quality metrics and ``seconds_<stage>``."""
    out = {_metric_name(k): v for k, v in _numbers(summary.get("metrics")).items()}
    seconds = {**_numbers(summary.get("seconds")), **_numbers(timings)}
    out.update({f"seconds_{_metric_name(k)}": v for k, v in seconds.items()})
    return dict(sorted(out.items()))


def summary_markdown(summary: Mapping[str, Any], *, output_uri: str = "", case_id: str = "") -> str:
    """A short Markdown report: the case, quality metrics, timings and where the results were published."""
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
    if seconds:
        lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
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

    with tempfile.TemporaryDirectory() as tmp:
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


_CASE_KEYS = {"id", "image", "prompt", "edit_prompt", "mode", "target_word", "mask"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _join_uri(base_dir: str, ref: str) -> str:
    """Resolve a manifest entry against the manifest's folder (URIs and absolute paths stay as they are)."""
    if not ref or _has_scheme(ref) or os.path.isabs(ref):
        return ref
    return posixpath.join(base_dir, ref) if _has_scheme(base_dir) else os.path.join(base_dir, ref)


def parse_manifest(text: str, *, manifest_uri: str = "manifest", output_uri: str = "") -> list[dict[str, str]]:
    """Validate JSONL cases; each becomes a dict of strings (the ParallelFor item). Errors name the line."""
    base = posixpath.dirname(manifest_uri) if _has_scheme(manifest_uri) else os.path.dirname(manifest_uri)
    cases: list[dict[str, str]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{manifest_uri} line {lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidCaseError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise InvalidCaseError(f"{where}: each line must be a JSON object")
        unknown = set(entry) - _CASE_KEYS
        if unknown:
            raise InvalidCaseError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_CASE_KEYS)}")
        missing = [k for k in ("image", "prompt", "edit_prompt") if not entry.get(k)]
        if missing:
            raise InvalidCaseError(f"{where}: missing {', '.join(missing)}")
        case = {k: str(entry.get(k) or "") for k in sorted(_CASE_KEYS)}
        case["id"] = case["id"] or f"case-{len(cases):04d}"
        case["mode"] = case["mode"] or ("mask" if case["mask"] else "auto" if case["target_word"] else "whole")
        if not _ID.match(case["id"]):
            raise InvalidCaseError(f"{where}: id {case['id']!r} must be letters, digits, '.', '_' or '-'")
        if case["id"] in seen:
            raise InvalidCaseError(f"{where}: duplicate id {case['id']!r}")
        if case["mode"] not in ("auto", "mask", "whole"):
            raise InvalidCaseError(f"{where}: mode must be auto, mask or whole, got {case['mode']!r}")
        seen.add(case["id"])
        case["image"], case["mask"] = _join_uri(base, case["image"]), _join_uri(base, case["mask"])
        case["output_uri"] = f"{output_uri.rstrip('/')}/{case['id']}" if output_uri else ""
        cases.append(case)
    if not cases:
        raise InvalidCaseError(f"{manifest_uri}: no cases (one JSON object per line)")
    return cases


def read_manifest(manifest_uri: str, output_uri: str = "") -> list[dict[str, str]]:
    """Read a JSONL manifest by URI and validate it (see ``parse_manifest``)."""
    from . import storage

    return parse_manifest(storage.read_bytes(manifest_uri).decode("utf-8"), manifest_uri=manifest_uri,
                          output_uri=output_uri)


@dataclass
class BatchReport:
    """The batch summary page in HTML and Markdown, its figures, and the per-case rows."""

    html: str
    markdown: str
    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


def batch_report(results: Iterable[str]) -> BatchReport:
    """One page over every case (``case_result`` JSON strings), sorted by case id."""
    rows = sorted((json.loads(r) for r in results), key=lambda r: str(r.get("case_id", "")))
    metric_names = sorted({k for r in rows for k in r.get("metrics", {})})
    head = ["case", "mode", "prompt", "edit prompt", *metric_names, "seconds", "results"]
    body, md = [], ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spec, metrics = r.get("spec", {}), r.get("metrics", {})
        total = r.get("seconds", {}).get("total", sum(r.get("seconds", {}).values()))
        uri = r.get("output_uri", "")
        cells = [r.get("case_id", ""), spec.get("mode", ""), spec.get("prompt", ""), spec.get("edit_prompt", ""),
                 *[f"{metrics[m]:.4g}" if m in metrics else "" for m in metric_names], f"{total:.1f}",
                 f"{uri}/report.html" if uri else ""]
        link = f'<a href="{html.escape(cells[-1])}">report</a>' if uri else ""
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells[:-1]) + f"<td>{link}</td></tr>")
        md.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>EditInfinity batch</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<h1>EditInfinity batch: {len(rows)} cases</h1><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body)
            + "</table></body></html>\n")
    figures: dict[str, float] = {"cases": float(len(rows))}
    for m in metric_names:
        values = [r["metrics"][m] for r in rows if m in r.get("metrics", {})]
        figures[f"mean_{_metric_name(m)}"] = sum(values) / len(values)
    return BatchReport(html=page, markdown=f"# EditInfinity batch: {len(rows)} cases\n\n" + "\n".join(md) + "\n",
                       metrics=figures, rows=rows)


def publish_batch(output_uri: str, report: BatchReport) -> str:
    """Write ``index.html``, ``summary.md`` and ``summary.jsonl`` under ``output_uri`` ("" when none given)."""
    if not output_uri:
        return ""
    from . import storage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "index.html").write_text(report.html)
        (root / "summary.md").write_text(report.markdown)
        (root / "summary.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in report.rows))
        for name in ("index.html", "summary.md", "summary.jsonl"):
            storage.upload(root / name, f"{output_uri.rstrip('/')}/{name}")
    return output_uri


# ---------------------------------------------------------------------------------------------------------------
# `editinfinity pipeline ...`
# ---------------------------------------------------------------------------------------------------------------


def _params(items: list[str], types: Mapping[str, str]) -> dict[str, Any]:
    """KEY=VALUE pairs typed by the pipeline's declared parameter types (``types``: name -> kind)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep or not key:
            raise EditInfinityError(f"pipeline parameter {item!r} must look like KEY=VALUE")
        if key not in types:
            raise EditInfinityError(f"unknown pipeline parameter {key!r}; known: {', '.join(sorted(types))}")
        kind = types[key].upper()
        try:
            if "INT" in kind:
                out[key] = int(value)
            elif "DOUBLE" in kind or "FLOAT" in kind:
                out[key] = float(value)
            elif "BOOL" in kind:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = value
        except ValueError:
            raise EditInfinityError(f"pipeline parameter {key!r} must be {types[key]}, got {value!r}") from None
    return out


def _package_parameter_types(package: str | os.PathLike) -> dict[str, str]:
    import yaml

    path = Path(package)
    if not path.is_file():
        raise EditInfinityError(f"pipeline package {path} does not exist; run `editinfinity pipeline compile`")
    spec = next(yaml.safe_load_all(path.read_text()))
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: p.get("parameterType", "STRING") for name, p in params.items()}


def _cmd_compile(args: argparse.Namespace) -> int:
    path = compile_pipeline(args.pipeline_option or args.pipeline, args.profile, args.out, fused=args.fused,
                            profiles_files=args.profiles, parallelism=args.parallelism)
    print(path)
    return 0


def _cmd_run_local(args: argparse.Namespace) -> int:
    graph = build_pipeline(args.pipeline, None, fused=args.fused)
    types = {name: spec.type for name, spec in graph.component_spec.inputs.items()}
    run = run_local(args.pipeline, pipeline_root=args.pipeline_root, fused=args.fused, **_params(args.param, types))
    print(json.dumps({"pipeline_root": str(run.pipeline_root), "run_dir": str(run.run_dir or ""),
                      "output": run.output}, indent=2, sort_keys=True))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    params = _params(args.param, _package_parameter_types(args.package))
    run_id = submit(args.host, args.experiment, args.package, params, namespace=args.namespace,
                    token_env=args.token_env, run_name=args.run_name, service_account=args.service_account)
    print(run_id)
    return 0


def add_pipeline_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``editinfinity pipeline compile|run-local|submit`` (each sets ``handler``)."""
    p = sub.add_parser("pipeline", help="Kubeflow Pipelines: compile, run locally, submit")
    cmds = p.add_subparsers(dest="pipeline_command", required=True)

    c = cmds.add_parser("compile", help="compile a pipeline to KFP YAML for a scheduling profile")
    c.add_argument("pipeline", nargs="?", default="edit", choices=PIPELINES)
    c.add_argument("--pipeline", dest="pipeline_option", default=None, choices=PIPELINES,
                   help="the same as the positional PIPELINE (e.g. --pipeline piebench)")
    c.add_argument("--profile", default=None, help="profile from pipelines/profiles.yaml (gke-a100, gke-l4, "
                                                   "eks-p4d, on-prem, ...); none: no Kubernetes settings")
    c.add_argument("--profiles", action="append", default=None, metavar="FILE", help="extra profiles YAML")
    c.add_argument("--fused", action="store_true", help="all GPU stages in one pod (one model load)")
    c.add_argument("--parallelism", type=int, default=None, help="batch: concurrent cases (default: profile's)")
    c.add_argument("--out", default="build/pipelines", help="output folder")
    c.set_defaults(handler=_cmd_compile)

    r = cmds.add_parser("run-local", help="run a pipeline here with kfp.local (subprocesses)")
    r.add_argument("pipeline", nargs="?", default="edit", choices=PIPELINES)
    r.add_argument("--pipeline-root", default="kfp-local", help="local folder for the artifacts")
    r.add_argument("--fused", action="store_true")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, e.g. -p image_uri=cat.png -p mode=auto (repeatable)")
    r.set_defaults(handler=_cmd_run_local)

    s = cmds.add_parser("submit", help="create a run on a KFP endpoint")
    s.add_argument("package", help="compiled pipeline YAML")
    s.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"), required="KF_PIPELINES_ENDPOINT" not in os.environ)
    s.add_argument("--experiment", default="editinfinity")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user)")
    s.add_argument("--token-env", default=None, metavar="VAR", help="environment variable holding a bearer token")
    s.add_argument("--run-name", default=None)
    s.add_argument("--service-account", default=None, help="e.g. editinfinity-runner (manifests/base)")
    s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(handler=_cmd_submit)
