"""Scheduling profiles: where GPU and CPU tasks run, read from ``profiles.yaml`` (plus user files).

A profile is data (see the header of ``profiles.yaml``); ``gpu_task``/``cpu_task`` apply it to a pipeline task
at compile time through ``kfp.kubernetes``. With ``profile=None`` (kfp.local runs) tasks get none of it, not even
retries (kfp.local honours retry policies, and a local failure is rarely transient).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kfp import kubernetes
from kfp.dsl import PipelineTask

from editinfinity.errors import EditInfinityError

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
#: Extra profile files (``os.pathsep``-separated); later files win.
PROFILES_ENV = "EDITINFINITY_PROFILES"

_KEYS = {"accelerator", "gpu_resources", "cpu_resources", "node_selector", "tolerations", "model_cache", "env",
         "storage_secret", "retries", "parallelism", "preset", "weights", "timeouts", "ttl_seconds_after_finished",
         "active_deadline_seconds", "worker_gpus", "spot", "local_weights"}
_TIMEOUTS = {"stage", "worker", "cpu"}
_OPERATORS = ("Exists", "Equal")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}


class ProfileError(EditInfinityError):
    """A scheduling profile is unknown or malformed; the message names the file, profile and key."""


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str


@dataclass(frozen=True)
class Profile:
    """Scheduling settings for one cluster flavour (one entry of ``profiles.yaml``)."""

    name: str
    accelerator_type: str
    accelerator_count: int
    gpu: Resources
    cpu: Resources
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    model_cache_pvc: str | None = None
    model_cache_path: str = "/models"
    env: dict[str, str] = field(default_factory=dict)
    storage_secret: str | None = None
    storage_secret_env: dict[str, str] = field(default_factory=dict)
    retries: int = 2
    parallelism: int = 4
    preset: str = ""
    weights: str = ""
    #: Pod deadlines (seconds): a per-stage or fused GPU pod, a batch worker pod, a CPU pod.
    stage_timeout: int = 7200
    worker_timeout: int = 28800
    cpu_timeout: int = 3600
    #: Seconds the finished run's workflow (pods, logs) is kept; None keeps it until deleted.
    ttl_seconds_after_finished: int | None = 259200
    #: Deadline of the whole run; None for none.
    active_deadline_seconds: int | None = None
    #: GPUs of one batch worker pod (one worker process each).
    worker_gpus: int = 1
    #: Extra node selector and tolerations of batch workers: spot / preemptible nodes (workers resume).
    spot_node_selector: dict[str, str] = field(default_factory=dict)
    spot_tolerations: tuple[dict, ...] = ()
    #: Batch workers copy the weights to a node-local emptyDir of this size (e.g. "40Gi") first; "" reads in place.
    local_weights_size: str = ""
    local_weights_path: str = "/local-weights"


def profile_files(extra: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """The built-in file, then ``$EDITINFINITY_PROFILES`` entries, then ``extra``, in merge order."""
    files = [PROFILES_FILE]
    files += [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    files += [Path(p) for p in (extra or [])]
    return files


def _merge(base: dict, over: dict) -> dict:
    """Key by key; ``env`` merges variable by variable so a profile can add one without repeating the rest."""
    out = {**base, **over}
    if isinstance(base.get("env"), dict) and isinstance(over.get("env"), dict):
        out["env"] = {**base["env"], **over["env"]}
    return out


def load_raw_profiles(extra: Iterable[str | os.PathLike] | None = None) -> dict[str, dict]:
    """Merged raw profile dicts (defaults applied), keyed by profile name."""
    defaults: dict = {}
    profiles: dict[str, dict] = {}
    for path in profile_files(extra):
        if not path.is_file():
            raise ProfileError(f"profiles file {path} does not exist; fix --profiles or ${PROFILES_ENV}")
        doc = yaml.safe_load(path.read_text()) or {}
        unknown = set(doc) - {"defaults", "profiles"}
        if unknown:
            raise ProfileError(f"{path}: unknown top-level keys {sorted(unknown)}; use `defaults:` and `profiles:`")
        defaults = _merge(defaults, doc.get("defaults") or {})
        for name, body in (doc.get("profiles") or {}).items():
            profiles[name] = _merge(profiles.get(name, {}), body or {})
    return {name: _merge(defaults, body) for name, body in profiles.items()}


def _resources(name: str, key: str, value: dict) -> Resources:
    if not isinstance(value, dict) or set(value) != {"cpu", "memory"}:
        raise ProfileError(f"profile {name!r}: `{key}` needs exactly `cpu` and `memory`, got {value!r}")
    return Resources(cpu=str(value["cpu"]), memory=str(value["memory"]))


def _tolerations(name: str, items: list) -> tuple[dict, ...]:
    out = []
    for tol in items or []:
        bad = set(tol) - _TOLERATION_KEYS
        if bad:
            raise ProfileError(f"profile {name!r}: unknown toleration keys {sorted(bad)}; known {sorted(_TOLERATION_KEYS)}")
        if tol.get("operator", "Equal") not in _OPERATORS:
            raise ProfileError(f"profile {name!r}: toleration operator must be one of {_OPERATORS}, got {tol['operator']!r}")
        if tol.get("effect") is not None and tol["effect"] not in _EFFECTS:
            raise ProfileError(f"profile {name!r}: toleration effect must be one of {_EFFECTS}, got {tol['effect']!r}")
        out.append({k: (str(v) if k in ("key", "value") else v) for k, v in tol.items()})
    return tuple(out)


def _build(name: str, raw: dict) -> Profile:
    unknown = set(raw) - _KEYS
    if unknown:
        raise ProfileError(f"profile {name!r}: unknown keys {sorted(unknown)}; known keys: {sorted(_KEYS)}")
    acc = raw.get("accelerator") or {}
    count = acc.get("count", 1)
    if not isinstance(count, int) or count < 1:
        raise ProfileError(f"profile {name!r}: accelerator.count must be an integer >= 1, got {count!r}")
    cache = raw.get("model_cache") or {}
    secret = raw.get("storage_secret") or {}
    if secret and (not secret.get("name") or not secret.get("env")):
        raise ProfileError(f"profile {name!r}: storage_secret needs `name` and `env` (ENV_VAR: secret key)")
    parallelism = raw.get("parallelism", 4)
    if not isinstance(parallelism, int) or parallelism < 1:
        raise ProfileError(f"profile {name!r}: parallelism must be an integer >= 1, got {parallelism!r}")
    timeouts = raw.get("timeouts") or {}
    bad = set(timeouts) - _TIMEOUTS
    if bad or not all(isinstance(v, int) and v > 0 for v in timeouts.values()):
        raise ProfileError(f"profile {name!r}: `timeouts` takes positive seconds for {sorted(_TIMEOUTS)}, "
                           f"got {timeouts!r}")
    spot = raw.get("spot") or {}
    if set(spot) - {"node_selector", "tolerations"}:
        raise ProfileError(f"profile {name!r}: `spot` takes `node_selector` and `tolerations`, got {sorted(spot)}")
    local = raw.get("local_weights") or {}
    if set(local) - {"size", "path"}:
        raise ProfileError(f"profile {name!r}: `local_weights` takes `size` and `path`, got {sorted(local)}")
    worker_gpus = raw.get("worker_gpus", 1)
    if not isinstance(worker_gpus, int) or worker_gpus < 1:
        raise ProfileError(f"profile {name!r}: worker_gpus must be an integer >= 1, got {worker_gpus!r}")
    defaults = Profile.__dataclass_fields__
    return Profile(
        name=name,
        stage_timeout=int(timeouts.get("stage", defaults["stage_timeout"].default)),
        worker_timeout=int(timeouts.get("worker", defaults["worker_timeout"].default)),
        cpu_timeout=int(timeouts.get("cpu", defaults["cpu_timeout"].default)),
        ttl_seconds_after_finished=raw.get("ttl_seconds_after_finished",
                                           defaults["ttl_seconds_after_finished"].default),
        active_deadline_seconds=raw.get("active_deadline_seconds"),
        worker_gpus=worker_gpus,
        spot_node_selector={str(k): str(v) for k, v in (spot.get("node_selector") or {}).items()},
        spot_tolerations=_tolerations(name, spot.get("tolerations")),
        local_weights_size=str(local.get("size") or ""),
        local_weights_path=str(local.get("path") or "/local-weights"),
        accelerator_type=str(acc.get("type", "nvidia.com/gpu")),
        accelerator_count=count,
        gpu=_resources(name, "gpu_resources", raw.get("gpu_resources")),
        cpu=_resources(name, "cpu_resources", raw.get("cpu_resources")),
        node_selector={str(k): str(v) for k, v in (raw.get("node_selector") or {}).items()},
        tolerations=_tolerations(name, raw.get("tolerations")),
        model_cache_pvc=cache.get("pvc"),
        model_cache_path=str(cache.get("mount_path", "/models")),
        env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
        storage_secret=secret.get("name"),
        storage_secret_env={str(k): str(v) for k, v in (secret.get("env") or {}).items()},
        retries=int(raw.get("retries", 2)),
        parallelism=parallelism,
        preset=str(raw.get("preset") or ""),
        weights=str(raw.get("weights") or ""),
    )


def load_profiles(extra: Iterable[str | os.PathLike] | None = None) -> dict[str, Profile]:
    """All profiles, validated."""
    return {name: _build(name, raw) for name, raw in load_raw_profiles(extra).items()}


def get_profile(name: str, extra: Iterable[str | os.PathLike] | None = None) -> Profile:
    """One profile by name; the error lists the known names and where they come from."""
    profiles = load_profiles(extra)
    if name not in profiles:
        files = ", ".join(str(p) for p in profile_files(extra))
        raise ProfileError(f"unknown profile {name!r}; choose one of {', '.join(sorted(profiles))} (from {files})")
    return profiles[name]


# -- applying a profile to tasks -------------------------------------------------------------------------------


#: First retry delay (doubling after each failure).
RETRY_BACKOFF_SECONDS = 30


def retry_window(retries: int, attempt_seconds: int) -> int:
    """Argo's retry ``maxDuration`` counts from the first attempt's start: it must outlast every attempt (each up to
    the pod's deadline) plus the backoff delays, or later retries are never made."""
    backoff = sum(RETRY_BACKOFF_SECONDS * 2**i for i in range(retries))
    return (retries + 1) * attempt_seconds + backoff


def _common(task: PipelineTask, profile: Profile | None, timeout: int = 0, retries: bool = True) -> None:
    if profile is None:  # local runs: a failure is a bug or a bad input, not a preempted node; fail at once
        return
    if timeout:
        kubernetes.set_timeout(task, timeout)
    if retries and profile.retries > 0:
        task.set_retry(num_retries=profile.retries, backoff_duration=f"{RETRY_BACKOFF_SECONDS}s", backoff_factor=2.0,
                       backoff_max_duration=f"{retry_window(profile.retries, timeout or profile.stage_timeout)}s")
    for key, value in profile.env.items():
        task.set_env_variable(key, value)
    if profile.storage_secret:
        kubernetes.use_secret_as_env(task, secret_name=profile.storage_secret,
                                     secret_key_to_env={key: env for env, key in profile.storage_secret_env.items()})


def gpu_task(task: PipelineTask, profile: Profile | None, *, gpus: int | None = None, timeout: int | None = None,
             spot: bool = False) -> PipelineTask:
    """A GPU stage: accelerator, resources, node selector, tolerations, model cache, env, credentials, deadline,
    retries (a window that outlasts every attempt)."""
    _common(task, profile, timeout=timeout or (profile.stage_timeout if profile else 0))
    if profile is None:
        return task
    count = gpus or profile.accelerator_count
    task.set_accelerator_type(profile.accelerator_type).set_accelerator_limit(count)
    # Limits only: Kubernetes then sets requests equal to them (Guaranteed QoS on the GPU node). A worker with
    # several GPUs gets the per-GPU resources that many times.
    task.set_cpu_limit(_times(profile.gpu.cpu, count // profile.accelerator_count or 1))
    task.set_memory_limit(_times(profile.gpu.memory, count // profile.accelerator_count or 1))
    selector = {**profile.node_selector, **(profile.spot_node_selector if spot else {})}
    for key, value in selector.items():
        kubernetes.add_node_selector(task, key, value)
    for tol in (*profile.tolerations, *(profile.spot_tolerations if spot else ())):
        kubernetes.add_toleration(task, key=tol.get("key"), operator=tol.get("operator"), value=tol.get("value"),
                                  effect=tol.get("effect"), toleration_seconds=tol.get("toleration_seconds"))
    if profile.model_cache_pvc:
        kubernetes.mount_pvc(task, pvc_name=profile.model_cache_pvc, mount_path=profile.model_cache_path)
    return task


def worker_task(task: PipelineTask, profile: Profile | None) -> PipelineTask:
    """A batch worker pod: ``worker_gpus`` GPUs, the worker deadline, spot nodes when the profile names them (a
    preempted worker's retry resumes its shard), the node-local weights folder when the profile asks for one."""
    gpu_task(task, profile, gpus=profile.worker_gpus if profile else None,
             timeout=profile.worker_timeout if profile else None, spot=True)
    if profile is not None and profile.local_weights_size:
        kubernetes.empty_dir_mount(task, volume_name="local-weights", mount_path=profile.local_weights_path,
                                   size_limit=profile.local_weights_size)
    return task


def cpu_task(task: PipelineTask, profile: Profile | None, *, retries: bool = True) -> PipelineTask:
    """A CPU stage: modest resources, env, credentials, deadline and retries; no GPU, node selector or toleration.
    ``retries=False`` for steps whose failures are bad input (a retry would fail the same way)."""
    _common(task, profile, timeout=profile.cpu_timeout if profile else 0, retries=retries)
    if profile is not None:
        task.set_cpu_limit(profile.cpu.cpu).set_memory_limit(profile.cpu.memory)
    return task


def pipeline_config(profile: Profile | None):
    """Run-level settings: the finished workflow's time to live and the run's deadline (None without a profile)."""
    from kfp import dsl

    if profile is None or (profile.ttl_seconds_after_finished is None and profile.active_deadline_seconds is None):
        return None
    return dsl.PipelineConfig(ttl_seconds_after_finished=profile.ttl_seconds_after_finished,
                              active_deadline_seconds=profile.active_deadline_seconds)


def _times(quantity: str, n: int) -> str:
    """A Kubernetes quantity times ``n`` ("8" x 2 = "16", "48Gi" x 2 = "96Gi")."""
    if n == 1:
        return quantity
    digits = len(quantity) - len(quantity.lstrip("0123456789."))
    number, unit = quantity[:digits], quantity[digits:]
    value = float(number) * n
    return f"{int(value) if value.is_integer() else value}{unit}"
