"""``editinfinity pipeline compile|run-local|submit``: Kubeflow Pipelines from the command line.

Contributed to the core ``editinfinity`` command through the ``editinfinity.cli`` entry-point group
(``pipeline = "pipelines.cli:register"`` in pyproject.toml); the core CLI loads it only when ``pipeline`` is used,
so the library itself never imports kfp.

* ``compile_pipeline(pipeline, profile, out_dir, fused=False)``: a deterministic KFP YAML (same bytes every time).
* ``run_local(pipeline, **params)``: the pipeline under ``kfp.local`` (SubprocessRunner, this interpreter; or
  ``runner="docker"``: every task in its image, ``pipelines.docker_local``).
* ``submit(host, experiment, package_path, params, ...)``: create a run on a KFP endpoint through ``kfp.Client``.

What the pods run is plain library code (``editinfinity.runtime``, ``editinfinity.batch``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editinfinity.errors import EditInfinityError
from editinfinity.scratch import scratch_dir

from . import get_profile, make_batch_pipeline, make_edit_pipeline, make_piebench_pipeline

log = logging.getLogger(__name__)

PIPELINES = ("edit", "batch", "piebench")
#: Pipelines that also come in a ``fused`` variant (every GPU stage in one pod).
FUSED_PIPELINES = ("edit",)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class PipelineRunError(EditInfinityError):
    """A local pipeline run failed; the message names the failing task (its log is above)."""


class SubmitError(EditInfinityError):
    """The KFP endpoint could not be reached or refused the request; the message names the host and the reply."""


# ---------------------------------------------------------------------------------------------------------------
# Building and compiling
# ---------------------------------------------------------------------------------------------------------------


def build_pipeline(pipeline: str = "edit", profile: str | None = None, *, fused: bool = False,
                   profiles_files: Iterable[str | os.PathLike] | None = None, parallelism: int | None = None):
    """The pipeline object (a kfp ``GraphComponent``) for ``profile`` (None: no Kubernetes settings)."""
    if pipeline not in PIPELINES:
        raise EditInfinityError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    if fused and pipeline not in FUSED_PIPELINES:
        raise EditInfinityError(f"the {pipeline} pipeline has no fused variant (its edit step already runs every "
                                "stage in one pod); drop --fused")
    prof = get_profile(profile, profiles_files) if profile else None
    if pipeline == "edit":
        return make_edit_pipeline(prof, fused=fused)
    if pipeline == "piebench":
        return make_piebench_pipeline(prof, parallelism=parallelism)
    return make_batch_pipeline(prof, fused=fused, parallelism=parallelism)


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


RUNNERS = ("subprocess", "docker")


def _task_images(graph) -> list[str]:
    """The images the tasks of ``graph`` name (its deployment spec's executors)."""
    from google.protobuf import json_format

    spec = json_format.MessageToDict(graph.pipeline_spec)
    return sorted({e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e})


def run_local(pipeline: str = "edit", *, pipeline_root: str | os.PathLike = "kfp-local", fused: bool = False,
              parallelism: int | None = None, runner: str = "subprocess", image: str | None = None,
              **params: Any) -> LocalRun:
    """Run ``pipeline`` with ``kfp.local``.

    ``runner="subprocess"``: one subprocess per task with this interpreter (``use_venv=False``). ``"docker"``: one
    container per task through the Docker API, in the images the tasks name or all in ``image`` (see
    ``pipelines.docker_local``: real exit codes, the images' non-root user, local inputs staged under the root).
    Artifacts stay under ``pipeline_root`` (a local folder: kfp.local cannot write to a bucket); inputs and the
    final outputs still go through the object store by URI (``image_uri``, ``mask_uri``, ``output_uri``,
    ``manifest_uri``). ``params`` are the pipeline's parameters.
    """
    from kfp import local

    if runner not in RUNNERS:
        raise EditInfinityError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")
    if image and runner != "docker":
        raise EditInfinityError("--image only applies to --runner docker")
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    graph = build_pipeline(pipeline, None, fused=fused, parallelism=parallelism)
    tasks: Any = contextlib.nullcontext()
    if runner == "docker":
        from . import docker_local

        kfp_runner, params = docker_local.prepare(root, params, image, _task_images(graph))
        tasks = docker_local.container_tasks(image)
    else:
        kfp_runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=kfp_runner, pipeline_root=str(root), raise_on_error=True)
    try:
        with tasks, warnings.catch_warnings():  # display names etc. are for the KFP UI; kfp.local says so per task
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


#: States a run does not leave (KFP v2beta1 ``V2beta1RuntimeState``).
FINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")


class RunFailedError(EditInfinityError):
    """A submitted run ended in another state than SUCCEEDED, or did not end in time (``submit --wait``)."""

    exit_code = 1


@dataclass
class Auth:
    """How to authenticate to the KFP endpoint (at most one of them; none for an open endpoint).

    ``token_env``: a variable holding a bearer token; ``in_cluster``: the service account's projected token file
    (``KF_PIPELINES_SA_TOKEN_PATH`` or ``/var/run/secrets/kubeflow/pipelines/token``, kept fresh by the kubelet);
    ``cookies_env``: a variable holding the cookie header of a Dex / oauth2-proxy session
    (``authservice_session=...``); ``ca_cert``: the CA bundle of the endpoint's TLS certificate.
    """

    token_env: str | None = None
    in_cluster: bool = False
    cookies_env: str | None = None
    ca_cert: str | None = None

    def client_kwargs(self) -> dict[str, Any]:
        chosen = [n for n, v in (("--token-env", self.token_env), ("--in-cluster", self.in_cluster),
                                 ("--cookies-env", self.cookies_env)) if v]
        if len(chosen) > 1:
            raise EditInfinityError(f"choose one way to authenticate, not {' and '.join(chosen)}")
        kw: dict[str, Any] = {}
        if self.token_env:
            kw["existing_token"] = _env_secret(self.token_env, "the KFP bearer token", "--token-env")
        if self.cookies_env:
            kw["cookies"] = _env_secret(self.cookies_env, "the session cookie (e.g. authservice_session=...)",
                                        "--cookies-env")
        if self.in_cluster:
            from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
            if not Path(path).is_file():
                raise EditInfinityError(f"--in-cluster: no service-account token at {path}; run in a pod with the "
                                        f"projected KFP token volume, or set ${KF_PIPELINES_SA_TOKEN_ENV} to its path")
            kw["credentials"] = ServiceAccountTokenVolumeCredentials(path)
        if self.ca_cert:
            if not Path(self.ca_cert).is_file():
                raise EditInfinityError(f"--ca-cert {self.ca_cert} does not exist; give the PEM file of the CA that "
                                        "signed the endpoint's certificate")
            kw["ssl_ca_cert"] = str(self.ca_cert)
        return kw


def _env_secret(name: str, what: str, flag: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise EditInfinityError(f"${name} is empty or unset; export {what} in it (or drop {flag})")
    return value


@dataclass
class SubmittedRun:
    run_id: str
    state: str | None = None  # the final state when waited for
    pipeline_id: str | None = None
    version_id: str | None = None
    client: Any = field(default=None, repr=False, compare=False)


def submit(host: str, experiment: str, package_path: str | os.PathLike, params: Mapping[str, Any] | None = None,
           namespace: str | None = None, token_env: str | None = None, *, run_name: str | None = None,
           service_account: str | None = None, enable_caching: bool | None = None, auth: Auth | None = None,
           version: str | None = None, wait: bool = False, timeout: float | None = None,
           poll_seconds: float = 10.0) -> SubmittedRun:
    """Create a run of the compiled ``package_path`` in ``experiment`` (created when missing).

    ``version``: upload the package as that version of its pipeline (the pipeline is created on first use; a
    version name already taken is refused) and run the version, so runs keep a history and can be scheduled.
    ``enable_caching=False`` turns caching off for every task of the run. ``wait``: poll the run until it ends
    (or ``timeout`` seconds pass) and raise :class:`RunFailedError` unless it SUCCEEDED. ``namespace`` is the
    user's profile namespace on multi-user Kubeflow; ``auth`` (or the older ``token_env``) how to authenticate.
    """

    auth = auth or Auth(token_env=token_env)
    if not Path(package_path).is_file():
        raise EditInfinityError(f"pipeline package {package_path} does not exist; run `editinfinity pipeline compile`")
    client_kwargs: dict[str, Any] = {"host": host, **auth.client_kwargs()}
    if namespace:
        client_kwargs["namespace"] = namespace
    with contextlib.ExitStack() as stack:
        if enable_caching is False:
            # kfp.Client's enable_caching rewrites only the root DAG's tasks; tasks in condition branches, loops and
            # nested pipelines would still be cached. Turn it off in every DAG of a copy of the package instead.
            tmp = Path(stack.enter_context(scratch_dir("editinfinity-submit")))
            package_path = without_caching(package_path, tmp / Path(package_path).name)
            enable_caching = None
        run = _create(client_kwargs, host, package_path, version, experiment, namespace, params, run_name,
                      enable_caching, service_account)
    log.info("submitted run %s to %s (experiment %s)", run.run_id, host, experiment)
    if wait:
        run.state = wait_for_run(run.client, run.run_id, host=host, timeout=timeout, poll_seconds=poll_seconds)
    return run


def without_caching(package_path, out_path) -> Path:
    """A copy of a compiled package with caching off for every task of every DAG."""
    import yaml

    docs = list(yaml.safe_load_all(Path(package_path).read_text()))
    spec = docs[0]
    for dag in [spec["root"], *spec.get("components", {}).values()]:
        for task in dag.get("dag", {}).get("tasks", {}).values():
            task["cachingOptions"] = {}
    Path(out_path).write_text(yaml.safe_dump_all(docs, sort_keys=True))
    return Path(out_path)


def _create(client_kwargs, host, package_path, version, experiment, namespace, params, run_name, enable_caching,
            service_account) -> SubmittedRun:
    import kfp

    with _api_errors(host):
        client = kfp.Client(**client_kwargs)
        if version is None:
            result = client.create_run_from_pipeline_package(
                str(package_path), arguments=dict(params or {}), run_name=run_name, experiment_name=experiment,
                namespace=namespace, enable_caching=enable_caching, service_account=service_account)
            run = SubmittedRun(run_id=result.run_id)
        else:
            run = _run_version(client, package_path, version, experiment, namespace, params, run_name,
                               enable_caching, service_account)
    run.client = client
    return run


def _run_version(client, package_path, version: str, experiment: str, namespace: str | None, params,
                 run_name: str | None, enable_caching: bool | None, service_account: str | None) -> SubmittedRun:
    import yaml

    name = next(yaml.safe_load_all(Path(package_path).read_text()))["pipelineInfo"]["name"]
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package_path), pipeline_name=name, namespace=namespace).pipeline_id
    try:
        uploaded = client.upload_pipeline_version(str(package_path), pipeline_version_name=version,
                                                  pipeline_id=pipeline_id)
    except Exception as exc:  # kfp_server_api.ApiException: 409 when the name is taken
        if getattr(exc, "status", None) == 409:
            raise EditInfinityError(f"pipeline {name!r} already has a version {version!r}; choose another "
                                    "--version (e.g. the commit or tag)") from None
        raise
    exp = client.create_experiment(experiment, namespace=namespace)
    created = client.run_pipeline(exp.experiment_id, run_name or f"{name} {version}", params=dict(params or {}),
                                  pipeline_id=pipeline_id, version_id=uploaded.pipeline_version_id,
                                  enable_caching=enable_caching, service_account=service_account)
    return SubmittedRun(run_id=created.run_id, pipeline_id=pipeline_id, version_id=uploaded.pipeline_version_id)


def wait_for_run(client, run_id: str, *, host: str = "", timeout: float | None = None,
                 poll_seconds: float = 10.0) -> str:
    """Poll ``run_id`` until it reaches a final state; returns it, raising :class:`RunFailedError` unless it is
    SUCCEEDED (or when ``timeout`` seconds pass first)."""
    import time

    start = time.monotonic()
    with _api_errors(host):
        while True:
            state = str(client.get_run(run_id).state or "").upper()
            if state in FINAL_STATES:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                raise RunFailedError(f"run {run_id} is still {state or 'unknown'} after {timeout:g} s (--timeout); "
                                     "it goes on on the cluster")
            time.sleep(poll_seconds)
    if state != "SUCCEEDED":
        raise RunFailedError(f"run {run_id} ended {state}; see its page in the KFP UI for the failing task's log")
    log.info("run %s succeeded", run_id)
    return state


@contextlib.contextmanager
def _api_errors(host: str):
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        hint = " (check the token and --namespace)" if exc.status in (401, 403) else ""
        raise SubmitError(f"KFP endpoint {host} answered {exc.status} {exc.reason}{hint}: {exc.body}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise SubmitError(f"cannot reach the KFP endpoint {host}: {exc.__class__.__name__}; check --host "
                          "(e.g. https://kubeflow.example.com/pipeline) and the network") from None


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
    run = run_local(args.pipeline, pipeline_root=args.pipeline_root, fused=args.fused, runner=args.runner,
                    image=args.image, **_params(args.param, types))
    print(json.dumps({"pipeline_root": str(run.pipeline_root), "run_dir": str(run.run_dir or ""),
                      "output": run.output}, indent=2, sort_keys=True))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    params = _params(args.param, _package_parameter_types(args.package))
    auth = Auth(token_env=args.token_env, in_cluster=args.in_cluster, cookies_env=args.cookies_env,
                ca_cert=args.ca_cert)
    run = submit(args.host, args.experiment, args.package, params, namespace=args.namespace, auth=auth,
                 run_name=args.run_name, service_account=args.service_account,
                 enable_caching=False if args.no_cache else None, version=args.version, wait=args.wait,
                 timeout=args.timeout, poll_seconds=args.poll_seconds)
    print(run.run_id if run.state is None else f"{run.run_id} {run.state}")
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

    r = cmds.add_parser("run-local", help="run a pipeline here with kfp.local (subprocesses or containers)")
    r.add_argument("pipeline", nargs="?", default="edit", choices=PIPELINES)
    r.add_argument("--pipeline-root", default="kfp-local", help="local folder for the artifacts")
    r.add_argument("--fused", action="store_true", help="all GPU stages in one pod (one model load)")
    r.add_argument("--runner", default="subprocess", choices=RUNNERS,
                   help="subprocess: tasks in this virtualenv; docker: each task in its image through the Docker "
                        "API (DOCKER_HOST; podman's service works: docs/kubeflow.md)")
    r.add_argument("--image", default=None, help="--runner docker: run every task in this image (e.g. the CPU "
                                                 "image with preset=toy) instead of the ones the tasks name")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, e.g. -p image_uri=cat.png -p mode=auto (repeatable)")
    r.set_defaults(handler=_cmd_run_local)

    s = cmds.add_parser("submit", help="create a run on a KFP endpoint")
    s.add_argument("package", help="compiled pipeline YAML")
    s.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"), required="KF_PIPELINES_ENDPOINT" not in os.environ,
                   help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT)")
    s.add_argument("--experiment", default="editinfinity", help="experiment the run goes to (default editinfinity)")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user)")
    s.add_argument("--token-env", default=None, metavar="VAR", help="environment variable holding a bearer token")
    s.add_argument("--in-cluster", action="store_true",
                   help="authenticate with this pod's projected KFP service-account token")
    s.add_argument("--cookies-env", default=None, metavar="VAR",
                   help="environment variable holding a Dex / oauth2-proxy session cookie (authservice_session=...)")
    s.add_argument("--ca-cert", default=None, metavar="PEM", help="CA bundle of the endpoint's TLS certificate")
    s.add_argument("--version", default=None, metavar="NAME",
                   help="upload the package as this version of its pipeline and run that version")
    s.add_argument("--no-cache", action="store_true", help="run every task, whatever the compiled caching options")
    s.add_argument("--wait", action="store_true", help="wait for the run to end; exit 1 unless it succeeded")
    s.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="with --wait: give up after this")
    s.add_argument("--poll-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    s.add_argument("--run-name", default=None, help="name of the run (default: generated)")
    s.add_argument("--service-account", default=None, help="e.g. editinfinity-runner (manifests/base)")
    s.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, e.g. -p image_uri=gs://b/cat.png (repeatable)")
    s.set_defaults(handler=_cmd_submit)


def register(sub: argparse._SubParsersAction) -> None:
    """Entry point of the ``editinfinity.cli`` group: adds ``editinfinity pipeline ...``."""
    add_pipeline_parser(sub)
