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
         "storage_secret", "retries", "parallelism", "preset", "weights"}
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
    return Profile(
        name=name,
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


def _common(task: PipelineTask, profile: Profile | None) -> None:
    if profile is None:  # local runs: a failure is a bug or a bad input, not a preempted node; fail at once
        return
    if profile.retries > 0:
        task.set_retry(num_retries=profile.retries, backoff_duration="30s", backoff_factor=2.0,
                       backoff_max_duration="600s")
    for key, value in profile.env.items():
        task.set_env_variable(key, value)
    if profile.storage_secret:
        kubernetes.use_secret_as_env(task, secret_name=profile.storage_secret,
                                     secret_key_to_env={key: env for env, key in profile.storage_secret_env.items()})


def gpu_task(task: PipelineTask, profile: Profile | None) -> PipelineTask:
    """A GPU stage: accelerator, resources, node selector, tolerations, model cache, env, credentials, retries."""
    _common(task, profile)
    if profile is None:
        return task
    task.set_accelerator_type(profile.accelerator_type).set_accelerator_limit(profile.accelerator_count)
    # Limits only: Kubernetes then sets requests equal to them (Guaranteed QoS on the GPU node).
    task.set_cpu_limit(profile.gpu.cpu).set_memory_limit(profile.gpu.memory)
    for key, value in profile.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for tol in profile.tolerations:
        kubernetes.add_toleration(task, key=tol.get("key"), operator=tol.get("operator"), value=tol.get("value"),
                                  effect=tol.get("effect"), toleration_seconds=tol.get("toleration_seconds"))
    if profile.model_cache_pvc:
        kubernetes.mount_pvc(task, pvc_name=profile.model_cache_pvc, mount_path=profile.model_cache_path)
    return task


def cpu_task(task: PipelineTask, profile: Profile | None) -> PipelineTask:
    """A CPU stage: modest resources, env, credentials and retries; no GPU, node selector or toleration."""
    _common(task, profile)
    if profile is not None:
        task.set_cpu_limit(profile.cpu.cpu).set_memory_limit(profile.cpu.memory)
    return task
