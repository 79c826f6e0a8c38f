"""What ``kfp_cli.submit`` sends to a KFP endpoint, against a small fake of the KFP v2beta1 REST API.

This checks OUR side of the contract only: the experiment lookup/creation, the run-creation body (pipeline spec +
platform spec, parameters, experiment, service account), the namespace and the bearer-token header, as produced by
``kfp.Client`` 2.17.3 from our compiled package. It says nothing about whether a real Kubeflow Pipelines backend
accepts and schedules the spec; only a run on a cluster shows that. The fake listens on 127.0.0.1 only.
"""

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from editinfinity.errors import EditInfinityError
from pipelines import cli as kfp_cli

pytestmark = pytest.mark.filterwarnings("ignore:This client only works with Kubeflow Pipeline:FutureWarning")

ROOT = Path(__file__).resolve().parents[2]

CREATED = "2026-01-01T00:00:00Z"


class FakeKFP:
    """Records every request; answers healthz, experiments list/create, runs create/get."""

    def __init__(self, experiments: list[dict] | None = None, states: list[str] | None = None,
                 pipelines: list[dict] | None = None, taken_versions: tuple[str, ...] = ()):
        self.requests: list[dict] = []
        self.experiments = list(experiments or [])
        self.states = list(states or ["RUNNING"])  # what successive GETs of the run answer (the last repeats)
        self.pipelines = list(pipelines or [])
        self.taken_versions = set(taken_versions)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, body: dict, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                multipart = self.headers.get("Content-Type", "").startswith("multipart/")
                req = {"method": self.command, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                       "headers": {k.lower(): v for k, v in self.headers.items()},
                       "body": raw if multipart else json.loads(raw) if raw else None}
                fake.requests.append(req)
                return req

            def do_GET(self):  # noqa: N802
                req = self._record()
                if req["path"] == "/apis/v2beta1/healthz":
                    return self._reply({"multi_user": False, "commit_sha": "fake", "tag_name": "2.x"})
                if req["path"] == "/apis/v2beta1/experiments":
                    flt = json.loads(req["query"].get("filter", ["{}"])[0])
                    wanted = [p.get("stringValue", p.get("string_value")) for p in flt.get("predicates", [])
                              if p.get("key") == "display_name"]
                    found = [e for e in fake.experiments if not wanted or e["display_name"] in wanted]
                    return self._reply({"experiments": found, "total_size": len(found)} if found else {})
                if req["path"].startswith("/apis/v2beta1/runs/"):
                    state = fake.states.pop(0) if len(fake.states) > 1 else fake.states[0]
                    return self._reply({"run_id": req["path"].rsplit("/", 1)[1], "state": state,
                                        "created_at": CREATED})
                if req["path"] == "/apis/v2beta1/pipelines":
                    flt = json.loads(req["query"].get("filter", ["{}"])[0])
                    wanted = [p.get("stringValue") for p in flt.get("predicates", []) if p.get("key") == "display_name"]
                    found = [p for p in fake.pipelines if p["display_name"] in wanted]
                    return self._reply({"pipelines": found, "total_size": len(found)} if found else {})
                return self._reply({"error": "not found"}, 404)

            def do_POST(self):  # noqa: N802
                req = self._record()
                if req["path"] == "/apis/v2beta1/experiments":
                    exp = {**req["body"], "experiment_id": f"exp-{len(fake.experiments) + 1}", "created_at": CREATED}
                    fake.experiments.append(exp)
                    return self._reply(exp)
                if req["path"] == "/apis/v2beta1/runs":
                    return self._reply({**req["body"], "run_id": "run-123", "state": "PENDING",
                                        "created_at": CREATED})
                if req["path"] == "/apis/v2beta1/pipelines/upload":
                    pipeline = {"pipeline_id": f"pl-{len(fake.pipelines) + 1}", "display_name": req["query"]["name"][0],
                                "created_at": CREATED}
                    fake.pipelines.append(pipeline)
                    return self._reply(pipeline)
                if req["path"] == "/apis/v2beta1/pipelines/upload_version":
                    name = req["query"]["name"][0]
                    if name in fake.taken_versions:
                        return self._reply({"error": "version name exists"}, 409)
                    return self._reply({"pipeline_id": req["query"]["pipelineid"][0], "pipeline_version_id": "v-1",
                                        "display_name": name, "created_at": CREATED})
                return self._reply({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKFP":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return kfp_cli.compile_pipeline("edit", "gke-l4", tmp_path_factory.mktemp("pkg"))


PARAMS = {"image_uri": "gs://bucket/in/cat.png", "prompt": "a cat on a bench", "edit_prompt": "a dog on a bench",
          "mode": "auto", "target_word": "cat", "output_uri": "gs://bucket/out/cat2dog", "seed": 7}


def test_submit_creates_experiment_and_run(package, monkeypatch):
    monkeypatch.setenv("KFP_TEST_TOKEN", "s3cr3t-token")
    with FakeKFP() as fake:
        run = kfp_cli.submit(fake.url, "editinfinity-ci", package, PARAMS, namespace="team-vision",
                             token_env="KFP_TEST_TOKEN", run_name="ci-run", service_account="editinfinity-runner")
    assert run.run_id == "run-123" and run.state is None  # not waited for
    assert not fake.calls("GET", "/apis/v2beta1/healthz")  # a namespace was given: no multi-user probe
    for req in fake.requests:
        assert req["headers"].get("authorization") == "Bearer s3cr3t-token", req["path"]

    (lookup,) = fake.calls("GET", "/apis/v2beta1/experiments")
    assert lookup["query"]["namespace"] == ["team-vision"]
    predicate = json.loads(lookup["query"]["filter"][0])["predicates"][0]
    assert (predicate["key"], predicate["stringValue"]) == ("display_name", "editinfinity-ci")
    (create_exp,) = fake.calls("POST", "/apis/v2beta1/experiments")
    assert create_exp["body"] == {"display_name": "editinfinity-ci", "namespace": "team-vision"}

    (create_run,) = fake.calls("POST", "/apis/v2beta1/runs")
    body = create_run["body"]
    assert body["display_name"] == "ci-run"
    assert body["experiment_id"] == "exp-1"
    assert body["service_account"] == "editinfinity-runner"
    assert body["runtime_config"]["parameters"] == PARAMS
    spec, platform = yaml.safe_load_all(package.read_text())
    sent = body["pipeline_spec"]
    assert sent["pipeline_spec"]["pipelineInfo"] == spec["pipelineInfo"]
    assert sent["pipeline_spec"]["deploymentSpec"] == spec["deploymentSpec"]
    assert sent["platform_spec"] == platform  # node selectors, tolerations, PVC mount travel with the run
    gen = sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-generate"]
    assert gen["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_submit_reuses_existing_experiment(package):
    existing = {"experiment_id": "exp-42", "display_name": "nightly", "namespace": "team-vision",
                "created_at": CREATED}
    with FakeKFP([existing]) as fake:
        kfp_cli.submit(fake.url, "nightly", package, PARAMS, namespace="team-vision")
    assert not fake.calls("POST", "/apis/v2beta1/experiments")
    (create_run,) = fake.calls("POST", "/apis/v2beta1/runs")
    assert create_run["body"]["experiment_id"] == "exp-42"
    assert all("authorization" not in r["headers"] for r in fake.requests)  # no token asked for, none sent


def test_submit_without_namespace_probes_healthz(package):
    with FakeKFP() as fake:
        kfp_cli.submit(fake.url, "default-ns", package, {"image_uri": "s3://b/x.png", "prompt": "p",
                                                         "edit_prompt": "q"})
    assert fake.calls("GET", "/apis/v2beta1/healthz")
    (create_run,) = fake.calls("POST", "/apis/v2beta1/runs")
    assert create_run["body"]["runtime_config"]["parameters"] == {"image_uri": "s3://b/x.png", "prompt": "p",
                                                                  "edit_prompt": "q"}


def test_submit_refuses_missing_token_before_any_request(package, monkeypatch):
    monkeypatch.delenv("KFP_MISSING_TOKEN", raising=False)
    with FakeKFP() as fake:
        with pytest.raises(EditInfinityError, match="KFP_MISSING_TOKEN"):
            kfp_cli.submit(fake.url, "x", package, {}, namespace="ns", token_env="KFP_MISSING_TOKEN")
    assert fake.requests == []


def test_submit_refuses_missing_package(tmp_path):
    with pytest.raises(EditInfinityError, match="does not exist"):
        kfp_cli.submit("http://127.0.0.1:9", "x", tmp_path / "nope.yaml", {}, namespace="ns")


def test_cli_submit_types_parameters_from_the_package(package, monkeypatch, capsys):
    from editinfinity.cli import main

    monkeypatch.setenv("KFP_TEST_TOKEN", "tok")
    with FakeKFP() as fake:
        code = main(["pipeline", "submit", str(package), "--host", fake.url, "--namespace", "ns",
                     "--token-env", "KFP_TEST_TOKEN", "--experiment", "cli", "-p", "image_uri=s3://b/a.png",
                     "-p", "prompt=a cat, sitting", "-p", "edit-prompt=a dog", "-p", "seed=7", "-p", "threshold=0.25",
                     "-p", "target_word=123"])
    assert code == 0 and capsys.readouterr().out.strip().endswith("run-123")
    (create_run,) = fake.calls("POST", "/apis/v2beta1/runs")
    assert create_run["body"]["runtime_config"]["parameters"] == {
        "image_uri": "s3://b/a.png", "prompt": "a cat, sitting", "edit_prompt": "a dog", "seed": 7,
        "threshold": 0.25, "target_word": "123"}


@pytest.mark.parametrize("param, message", [("colour=red", "unknown pipeline parameter 'colour'"),
                                            ("seed=seven", "'seed' must be NUMBER_INTEGER"),
                                            ("seed", "KEY=VALUE")])
def test_cli_submit_rejects_bad_parameters_before_any_request(package, capsys, param, message):
    from editinfinity.cli import main

    with FakeKFP() as fake:
        code = main(["pipeline", "submit", str(package), "--host", fake.url, "-p", param])
    assert code == 2 and message in capsys.readouterr().err
    assert fake.requests == []


def test_submit_errors_name_the_host(package):
    from pipelines.cli import SubmitError

    with FakeKFP() as fake:
        url = fake.url
    with pytest.raises(SubmitError, match=re.escape(f"cannot reach the KFP endpoint {url}")):
        kfp_cli.submit(url, "x", package, {}, namespace="ns")  # the fake is gone: connection refused


def test_submit_reports_an_http_error(package):
    from pipelines.cli import SubmitError

    with FakeKFP() as fake:
        with pytest.raises(SubmitError, match=r"answered 404"):
            kfp_cli.submit(fake.url + "/nowhere", "x", package, {}, namespace="ns")


# -- CI gating: --wait, --version, --no-cache, authentication ---------------------------------------------------


def _cli_submit(fake, package, *extra):
    from editinfinity.cli import main

    return main(["pipeline", "submit", str(package), "--host", fake.url, "--namespace", "ns", "--poll-seconds", "0.01",
                 "-p", "image_uri=s3://b/a.png", "-p", "prompt=p", "-p", "edit_prompt=q", *extra])


@pytest.mark.parametrize("states, code, needle", [
    (["PENDING", "RUNNING", "SUCCEEDED"], 0, "run-123 SUCCEEDED"),
    (["RUNNING", "FAILED"], 1, "ended FAILED"),
    (["RUNNING", "CANCELED"], 1, "ended CANCELED"),
    (["RUNNING"], 1, "after 0.2 s (--timeout)"),
])
def test_wait_exits_non_zero_unless_the_run_succeeds(package, capsys, states, code, needle):
    with FakeKFP(states=states) as fake:
        assert _cli_submit(fake, package, "--wait", "--timeout", "0.2") == code
    out = capsys.readouterr()
    assert needle in (out.out if code == 0 else out.err)
    gets = fake.calls("GET", "/apis/v2beta1/runs/run-123")
    assert len(gets) >= min(len(states), 2)  # polled until a final state (or the timeout)


def test_version_uploads_the_package_and_runs_that_version(package):
    with FakeKFP() as fake:
        run = kfp_cli.submit(fake.url, "ci", package, PARAMS, namespace="ns", version="v1.2.3")
    name = yaml.safe_load(package.read_text().split("\n---")[0])["pipelineInfo"]["name"]
    (upload,) = fake.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == [name] and b"pipelineInfo" in upload["body"]
    (version,) = fake.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert version["query"]["name"] == ["v1.2.3"] and version["query"]["pipelineid"] == ["pl-1"]
    (create_run,) = fake.calls("POST", "/apis/v2beta1/runs")
    body = create_run["body"]
    assert body["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "v-1"}
    assert "pipeline_spec" not in body and body["runtime_config"]["parameters"] == PARAMS
    assert (run.pipeline_id, run.version_id) == ("pl-1", "v-1")
    # a second version of the same pipeline: no new pipeline; a taken name is refused with the fix
    with FakeKFP(pipelines=[{"pipeline_id": "pl-7", "display_name": name, "created_at": CREATED}],
                 taken_versions=("v1",)) as fake:
        kfp_cli.submit(fake.url, "ci", package, PARAMS, namespace="ns", version="v2")
        assert not fake.calls("POST", "/apis/v2beta1/pipelines/upload")
        assert fake.calls("POST", "/apis/v2beta1/pipelines/upload_version")[0]["query"]["pipelineid"] == ["pl-7"]
        with pytest.raises(EditInfinityError, match="already has a version 'v1'"):
            kfp_cli.submit(fake.url, "ci", package, PARAMS, namespace="ns", version="v1")


def test_no_cache_turns_caching_off_for_every_task(package):
    spec = next(yaml.safe_load_all(package.read_text()))
    assert any(t.get("cachingOptions", {}).get("enableCache") for c in [spec["root"], *spec["components"].values()]
               for t in c.get("dag", {}).get("tasks", {}).values())  # the package caches some tasks
    with FakeKFP() as fake:
        assert _cli_submit(fake, package, "--no-cache") == 0
    (create_run,) = fake.calls("POST", "/apis/v2beta1/runs")
    sent = create_run["body"]["pipeline_spec"]["pipeline_spec"]
    tasks = [t for c in [sent["root"], *sent["components"].values()] for t in c.get("dag", {}).get("tasks", {}).values()]
    assert tasks and not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks)


def test_in_cluster_token_and_dex_cookies(package, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("projected-sa-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    with FakeKFP() as fake:
        assert _cli_submit(fake, package, "--in-cluster") == 0
    assert all(r["headers"].get("authorization") == "Bearer projected-sa-token" for r in fake.requests)
    monkeypatch.setenv("DEX_COOKIE", "authservice_session=abc123")
    with FakeKFP() as fake:
        assert _cli_submit(fake, package, "--cookies-env", "DEX_COOKIE") == 0
    assert all(r["headers"].get("cookie") == "authservice_session=abc123" for r in fake.requests)
    assert all("authorization" not in r["headers"] for r in fake.requests)


@pytest.mark.parametrize("auth, needle", [
    (kfp_cli.Auth(in_cluster=True), "no service-account token"),
    (kfp_cli.Auth(ca_cert="/nonexistent/ca.pem"), "--ca-cert"),
    (kfp_cli.Auth(cookies_env="UNSET_COOKIE_VAR"), "UNSET_COOKIE_VAR"),
    (kfp_cli.Auth(token_env="X", cookies_env="Y"), "choose one way"),
])
def test_bad_auth_is_refused_before_any_request(package, monkeypatch, auth, needle):
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    monkeypatch.setattr("kfp.client.KF_PIPELINES_SA_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.delenv("UNSET_COOKIE_VAR", raising=False)
    with FakeKFP() as fake:
        with pytest.raises(EditInfinityError, match=re.escape(needle)):
            kfp_cli.submit(fake.url, "x", package, PARAMS, namespace="ns", auth=auth)
    assert fake.requests == []


def test_ca_cert_reaches_the_client(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert kfp_cli.Auth(ca_cert=str(ca)).client_kwargs() == {"ssl_ca_cert": str(ca)}
