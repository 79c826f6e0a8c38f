"""``run-local --runner docker`` pieces that need no engine: input staging, exit codes, rlimits.

The containers themselves run in ``make image-test`` (images/test.sh), which needs podman or docker.
"""

import os
import resource

import docker
import pytest
from kfp.local import docker_task_handler

from editinfinity.errors import EditInfinityError
from pipelines import docker_local
from pipelines.docker_local import DockerRunError


def test_local_inputs_are_copied_under_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    src = tmp_path / "elsewhere" / "cat.png"
    src.parent.mkdir()
    src.write_bytes(b"png bytes")
    inside = root / "mine.png"
    inside.write_bytes(b"x")
    params = {"image_uri": str(src), "mask_uri": "", "prompt": str(src), "output_uri": str(root / "out"),
              "weights": "", "case_id": "c", "seed": 3}
    out = docker_local.stage_inputs(params, root)
    staged = out["image_uri"]
    assert staged != str(src) and staged.startswith(str(root / "inputs")) and staged.endswith("/cat.png")
    assert open(staged, "rb").read() == b"png bytes"
    # Not a URI parameter, empty, or already inside the root: unchanged (an inside path made absolute).
    assert out["prompt"] == str(src) and out["mask_uri"] == "" and out["seed"] == 3
    assert out["output_uri"] == str(root / "out")
    assert docker_local.stage_inputs({"image_uri": str(inside)}, root)["image_uri"] == str(inside)
    # Same content, same place: staging twice copies nothing new.
    assert docker_local.stage_inputs(params, root)["image_uri"] == staged
    assert len(list((root / "inputs").rglob("*.png"))) == 1
    # URIs pass through.
    assert docker_local.stage_inputs({"image_uri": "s3://b/k.png"}, root) == {"image_uri": "s3://b/k.png"}


@pytest.mark.parametrize("name, make, message", [
    ("output_uri", None, "not visible inside the containers"),
    ("image_uri", None, "does not exist"),
    ("data_uri", "dir", "a folder outside the pipeline root"),
    ("manifest_uri", "file", "a manifest"),
])
def test_what_the_containers_cannot_see_is_refused(tmp_path, name, make, message):
    root = tmp_path / "root"
    root.mkdir()
    path = tmp_path / "outside"
    if make == "dir":
        path.mkdir()
    elif make == "file":
        path.write_text("{}\n")
    with pytest.raises(DockerRunError, match=message):
        docker_local.stage_inputs({name: str(path)}, root)


class FakeContainer:
    id = "c0ffee"

    def __init__(self, code, remove_error=None):
        self.code, self.removed, self.remove_error = code, False, remove_error

    def logs(self, stream, follow):
        assert stream and follow
        return iter([b"line 1\n", b"line 2\n"])

    def wait(self):
        return {"StatusCode": self.code}

    def remove(self, force):
        if self.remove_error:
            raise self.remove_error
        self.removed = True


class FakeClient:
    def __init__(self, code, images=("img:1",)):
        self.container, self.runs, self._images = FakeContainer(code), [], images
        self.images = self
        self.containers = self
        self.api = type("Api", (), {"timeout": 60})()

    def get(self, name):
        if name not in self._images:
            raise docker.errors.ImageNotFound(name)

    def run(self, **kwargs):
        self.runs.append(kwargs)
        return self.container


@pytest.mark.parametrize("code", [0, 1, 137])
def test_the_real_exit_code_is_returned_and_the_container_removed(code, capsys):
    c = FakeClient(code)
    assert docker_local._run_container(c, "img:1", ["sh", "-c", "x"], {"/r": {"bind": "/r"}}, user="1") == code
    assert c.container.removed
    run = c.runs[0]
    assert run["detach"] and "auto_remove" not in run and run["user"] == "1" and run["image"] == "img:1"
    assert capsys.readouterr().out == "line 1\nline 2\n"
    assert c.api.timeout == docker_local.TASK_TIMEOUT


def test_a_slow_removal_does_not_change_the_exit_code():
    c = FakeClient(0)
    c.container.remove_error = TimeoutError("read timed out")
    assert docker_local._run_container(c, "img:1", [], {}) == 0


def test_missing_image_is_refused_and_override_used():
    with pytest.raises(DockerRunError, match="not on this machine"):
        docker_local._run_container(FakeClient(0), "other:2", [], {})
    c = FakeClient(0)
    assert docker_local._run_container(c, "ghcr.io/x:cuda", [], {}, image_override="img:1") == 0
    assert c.runs[0]["image"] == "img:1"


def test_kfp_docker_tasks_are_patched_only_while_active():
    original = docker_task_handler.run_docker_container
    with docker_local.container_tasks("img:1"):
        patched = docker_task_handler.run_docker_container
        assert patched is not original
        c = FakeClient(3)
        assert patched(c, "anything", [], {}) == 3 and c.runs[0]["image"] == "img:1"
    assert docker_task_handler.run_docker_container is original


def test_rlimits_never_above_this_process():
    limits = {u["Name"]: u for u in docker_local.ulimits()}
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, _ = resource.getrlimit(which)
        assert limits[name]["Soft"] == limits[name]["Hard"]
        assert soft == resource.RLIM_INFINITY or limits[name]["Soft"] <= soft
    assert limits["nproc"]["Soft"] <= docker_local.NPROC_LIMIT


class FakeImages:
    def __init__(self, users):
        self.users = users

    def get(self, name):
        if name not in self.users:
            raise docker.errors.ImageNotFound(name)
        return type("Image", (), {"attrs": {"Config": {"User": self.users[name]}}})()


class FakeEngine:
    def __init__(self, users):
        self.images, self.closed = FakeImages(users), False

    def close(self):
        self.closed = True


def test_prepare_gives_the_root_to_the_images_user_and_stages_inputs(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    src = tmp_path / "cat.png"
    src.write_bytes(b"png")
    engine = FakeEngine({"cpu:1": "1000:1000", "named:1": "app"})
    monkeypatch.setattr(docker_local, "client", lambda: engine)
    runner, params = docker_local.prepare(root, {"image_uri": str(src)}, "cpu:1", ["ghcr.io/x:cuda"])
    assert engine.closed and params["image_uri"].startswith(str(root / "inputs"))
    assert {u["Name"] for u in runner.container_run_args["ulimits"]} == {"nofile", "nproc"}
    assert runner.container_run_args["labels"] == {"io.editinfinity.pipeline-root": str(root)}
    st = root.stat()
    if os.getuid() == 0:
        assert (st.st_uid, st.st_gid) == (1000, 1000)
    else:
        assert st.st_mode & 0o777 == 0o777
    with pytest.raises(DockerRunError, match="not on this machine"):
        docker_local.prepare(root, {}, None, ["ghcr.io/x:cuda"])
    with pytest.raises(DockerRunError, match="only numeric USER"):
        docker_local.prepare(root, {}, "named:1", [])


def test_run_local_refuses_an_unknown_runner_and_a_stray_image():
    from pipelines import cli

    with pytest.raises(EditInfinityError, match="unknown runner"):
        cli.run_local(runner="k8s")
    with pytest.raises(EditInfinityError, match="only applies to --runner docker"):
        cli.run_local(image="cpu:1")
