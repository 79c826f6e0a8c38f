"""``run-local --runner docker``: every task of a pipeline in the built images, through the Docker API.

``kfp.local.DockerRunner`` starts one container per task with the pipeline root bind-mounted at the same path. Four
things make that work for this project's images (``images/``), all handled here:

* **Exit codes.** kfp 2.17.3 starts each container with ``auto_remove=True`` and, when the container is gone before
  its status is read, reports SUCCESS: a failed task looks green (kubeflow/pipelines#13332). While a run is in
  progress, ``run_docker_container`` of ``kfp.local.docker_task_handler`` is replaced by ``_run_container``, which
  keeps the container until ``wait()`` has returned its real exit code, then removes it.
* **The non-root user.** The images run as uid 1000; the pipeline root is made theirs (``chown`` when this process
  is root, else mode 777) so the tasks can write their outputs.
* **Local inputs.** A container sees only the pipeline root: local files named by ``*_uri`` parameters (and
  ``weights``) are copied under ``<pipeline root>/inputs/`` and the parameter rewritten; folders, manifests (their
  relative image paths resolve next to them) and a local ``output_uri`` outside the pipeline root are refused with
  a message saying what to do.
* **Engines.** Any Docker API (``DOCKER_HOST``): Docker, or podman's service
  (``podman --runtime runc system service --time=0 unix:///run/podman/podman.sock``). Containers get rlimits no
  higher than this process's own (podman's defaults ask for more than some hosts allow). Images are never pulled.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import resource
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from editinfinity.errors import EditInfinityError

log = logging.getLogger(__name__)

#: The most processes a task container may have (podman's default, 4194304, is refused on some hosts).
NPROC_LIMIT = 4096
#: Seconds the Docker API may take to answer (or a task's log to stay silent) before the run fails.
TASK_TIMEOUT = 3600
#: Parameters that are written to, not read: a local one must already be visible inside the containers.
OUTPUT_PARAMS = ("output_uri",)
#: Inputs whose relative references resolve next to them, so they cannot be copied alone.
NOT_COPYABLE = ("manifest_uri",)
PODMAN_HINT = ("podman: `podman --runtime runc system service --time=0 unix:///run/podman/podman.sock &` and "
               "`export DOCKER_HOST=unix:///run/podman/podman.sock`")


class DockerRunError(EditInfinityError):
    """The Docker API, an image or a local input is not usable for a containerised local run."""


def client():
    """A Docker API client for ``DOCKER_HOST`` (or the default socket); a clear error when none answers."""
    import docker

    try:
        c = docker.from_env()
        c.ping()
    except Exception as exc:  # docker.errors.DockerException, connection errors of every kind
        where = os.environ.get("DOCKER_HOST", "the default socket")
        raise DockerRunError(f"no Docker API answers at {where} ({exc.__class__.__name__}); start one, e.g. "
                             f"{PODMAN_HINT}") from None
    return c


def image_user(c, image: str) -> tuple[int, int]:
    """The numeric uid:gid ``image`` runs as (its ``USER``; root when unset)."""
    import docker

    try:
        user = c.images.get(image).attrs.get("Config", {}).get("User") or "0:0"
    except docker.errors.ImageNotFound:
        raise DockerRunError(f"image {image} is not on this machine; build it (`make images-cpu`, "
                             "docs/kubeflow.md) or name a built one with --image") from None
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise DockerRunError(f"image {image} runs as user {user!r}; only numeric USER uid[:gid] is supported")
    return int(uid), int(gid or uid)


def make_writable(root: Path, uid: int, gid: int) -> None:
    """Let ``uid`` write in ``root``: its owner when this process may chown, else a mode-777 folder."""
    if os.getuid() == uid:
        return
    if os.getuid() == 0:
        os.chown(root, uid, gid)
    else:
        log.info("making %s writable for the containers' uid %d (mode 777)", root, uid)
        root.chmod(0o777)


def _local_path(value: str) -> Path | None:
    if value.startswith("file://"):
        value = value[len("file://"):]
    if not value or "://" in value:
        return None
    return Path(value).expanduser().resolve()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def stage_inputs(params: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """``params`` with local inputs made visible inside the containers (see the module docstring)."""
    out = dict(params)
    for name, value in params.items():
        if not isinstance(value, str) or not (name.endswith("_uri") or name == "weights"):
            continue
        path = _local_path(value)
        if path is None or _inside(path, root):
            out[name] = str(path) if path is not None else value
            continue
        if name in OUTPUT_PARAMS:
            raise DockerRunError(f"{name}={value} is not visible inside the containers: give a folder under the "
                                 f"pipeline root ({root}/...) or a gs:// / s3:// URI")
        if not path.exists():
            if name == "weights":  # a hub id or preset-relative name: the pod resolves it
                continue
            raise DockerRunError(f"{name}={value} does not exist")
        if path.is_dir() or name in NOT_COPYABLE:
            what = "a folder" if path.is_dir() else "a manifest (its image paths resolve next to it)"
            raise DockerRunError(f"{name}={value} is {what} outside the pipeline root, which the containers cannot "
                                 f"see: copy it under {root}/ or use a gs:// / s3:// URI")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        dest = root / "inputs" / digest / path.name
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(dest)
        log.info("%s: %s copied to %s (visible inside the containers)", name, value, dest)
        out[name] = str(dest)
    return out


def ulimits() -> list:
    """nofile and nproc at or below this process's soft limits (a container may not raise them)."""
    import docker

    limits = []
    for name, which, cap in (("nofile", resource.RLIMIT_NOFILE, 1 << 20), ("nproc", resource.RLIMIT_NPROC,
                                                                            NPROC_LIMIT)):
        soft, _ = resource.getrlimit(which)
        value = cap if soft == resource.RLIM_INFINITY else min(soft, cap)
        limits.append(docker.types.Ulimit(name=name, soft=value, hard=value))
    return limits


def _run_container(client, image: str, command: list[str], volumes: dict[str, Any], *,
                   image_override: str | None = None, **run_args: Any) -> int:
    """One task's container: its logs streamed, its real exit code returned, then removed (see #13332 above)."""
    import docker

    image = image_override or image
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise DockerRunError(f"image {image} is not on this machine (images are never pulled here); build it "
                             "(`make images-cpu`) or run every task in a built one with --image") from None
    # A task may be silent for minutes (training) and a busy engine slow to answer: the client's default 60 s
    # read timeout would end the log stream, or fail a finished task on its removal.
    client.api.timeout = TASK_TIMEOUT
    container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                      volumes=volumes, **run_args)
    try:
        for chunk in container.logs(stream=True, follow=True):
            # kfp.local shows each task's log where its own runners do: print(), indented by kfp.
            print(chunk.decode("utf-8", errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        try:
            container.remove(force=True)
        except Exception as exc:  # the exit code is known; a container left behind is only untidy
            log.warning("could not remove container %s (%s): remove it with `docker rm -f` / `podman rm -f`",
                        container.id, exc.__class__.__name__)


@contextlib.contextmanager
def container_tasks(image_override: str | None = None) -> Iterator[None]:
    """While active, kfp.local's Docker tasks run through ``_run_container`` (real exit codes)."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container

    def run(client, image, command, volumes, **run_args):
        return _run_container(client, image, command, volumes, image_override=image_override, **run_args)

    docker_task_handler.run_docker_container = run
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def prepare(root: Path, params: Mapping[str, Any], image: str | None, images: list[str]):
    """Check the engine and images, make ``root`` writable for the images' user, stage the local inputs.

    Returns ``(runner, params)``: a ``kfp.local.DockerRunner`` and the parameters to call the pipeline with.
    ``images`` are the images the pipeline's tasks name (all replaced by ``image`` when given).
    """
    from kfp import local

    c = client()
    try:
        users = {image_user(c, name) for name in ([image] if image else sorted(set(images)))}
    finally:
        c.close()
    for uid, gid in users:
        make_writable(root, uid, gid)
    # The label lets a caller find (and remove) the containers of this pipeline root if it stops a run midway.
    runner = local.DockerRunner(ulimits=ulimits(), labels={"io.editinfinity.pipeline-root": str(root)})
    return runner, stage_inputs(params, root)
