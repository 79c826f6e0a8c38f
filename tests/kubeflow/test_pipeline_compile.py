"""Compiled KFP YAML: scheduling per profile, artifact wiring, strict protobuf parse, determinism, no pip installs.

These check the IR we hand to Kubeflow Pipelines; whether a real KFP backend schedules it is only shown on a cluster.
"""

import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

ROOT = Path(__file__).resolve().parents[2]

from components import CPU_COMPONENTS, CPU_IMAGE, GPU_COMPONENTS, GPU_IMAGE  # noqa: E402
from pipelines import ProfileError, load_profiles  # noqa: E402
from pipelines import cli as kfp_cli  # noqa: E402

PROFILES = load_profiles()
REQUIRED_PROFILES = {"gke-a100", "gke-l4", "eks-p4d", "on-prem"}


def component_of(name: str) -> str:
    """'exec-generate-2' / 'comp-generate-2' -> 'generate'."""
    return re.sub(r"-\d+$", "", re.sub(r"^(exec|comp)-", "", name))


def load(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    assert len(docs) in (1, 2)
    return docs[0], (docs[1] if len(docs) == 2 else {})


def k8s_executors(platform: dict) -> dict:
    return (platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {}))


class Compiled:
    """Compile on first use, once per module: (pipeline, profile, fused) -> YAML path."""

    def __init__(self, out: Path):
        self.out, self.paths = out, {}

    def __getitem__(self, key: tuple[str, str | None, bool]) -> Path:
        if key not in self.paths:
            pipeline, profile, fused = key
            self.paths[key] = kfp_cli.compile_pipeline(pipeline, profile, self.out, fused=fused)
        return self.paths[key]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Compiled:
    return Compiled(tmp_path_factory.mktemp("compiled"))


#: Per profile: the edit pipeline both ways and the batch pipeline.
VARIANTS = [(p, pipeline, fused) for p in sorted(PROFILES) for pipeline, fused in
            [("edit", False), ("edit", True), ("batch", False)]]


def test_required_profiles_exist():
    assert REQUIRED_PROFILES <= set(PROFILES)
    for name in REQUIRED_PROFILES:
        p = PROFILES[name]
        assert p.accelerator_type == "nvidia.com/gpu" and p.accelerator_count >= 1
        assert p.node_selector and p.tolerations, name


@pytest.mark.parametrize("profile, pipeline, fused", VARIANTS)
def test_gpu_tasks_get_profile_cpu_tasks_none(compiled, profile, pipeline, fused):
    spec, platform = load(compiled[(pipeline, profile, fused)])
    prof = PROFILES[profile]
    executors = spec["deploymentSpec"]["executors"]
    k8s = k8s_executors(platform)
    seen = set()
    for exec_name, ex in executors.items():
        comp = component_of(exec_name)
        seen.add(comp)
        container = ex["container"]
        res = container.get("resources", {})
        cfg = k8s.get(exec_name, {})
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert {k: env.get(k) for k in prof.env} == prof.env, exec_name
        if prof.storage_secret:
            (secret,) = cfg["secretAsEnv"]
            assert secret["secretName"] == prof.storage_secret
            assert {m["envVar"] for m in secret["keyToEnv"]} == set(prof.storage_secret_env)
        else:
            assert "secretAsEnv" not in cfg
        if comp in GPU_COMPONENTS:
            worker = comp == "batch-worker"
            assert container["image"] == GPU_IMAGE
            assert res["accelerator"]["resourceType"] == prof.accelerator_type
            assert res["accelerator"]["resourceCount"] == str(prof.worker_gpus if worker else prof.accelerator_count)
            if not worker or prof.worker_gpus == prof.accelerator_count:
                assert res["resourceCpuLimit"] == prof.gpu.cpu and res["resourceMemoryLimit"] == prof.gpu.memory
            assert "resourceCpuRequest" not in res  # Kubernetes sets requests = limits (Guaranteed QoS)
            assert cfg["nodeSelector"]["labels"] == {**prof.node_selector, **(prof.spot_node_selector if worker
                                                                              else {})}
            assert cfg["tolerations"] == [dict(t) for t in (*prof.tolerations,
                                                            *(prof.spot_tolerations if worker else ()))]
            assert int(cfg["activeDeadlineSeconds"]) == (prof.worker_timeout if worker else prof.stage_timeout)
            if prof.model_cache_pvc:
                (mount,) = cfg["pvcMount"]
                assert mount["mountPath"] == prof.model_cache_path
                assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == prof.model_cache_pvc
        else:
            assert comp in CPU_COMPONENTS, exec_name
            assert container["image"] == CPU_IMAGE
            assert "accelerator" not in res
            assert res["resourceCpuLimit"] == prof.cpu.cpu and res["resourceMemoryLimit"] == prof.cpu.memory
            assert not {"nodeSelector", "tolerations", "pvcMount", "nodeAffinity"} & set(cfg), exec_name
            assert int(cfg["activeDeadlineSeconds"]) == prof.cpu_timeout
    gpu_seen = seen & set(GPU_COMPONENTS)
    if pipeline == "batch":
        assert gpu_seen == {"batch-worker"}  # long-lived workers, never a pod per stage or per case
    elif fused:
        assert gpu_seen == {"fused-edit"}
        assert [n for n in executors if component_of(n) in GPU_COMPONENTS] == ["exec-fused-edit"]  # one GPU task
    else:
        assert gpu_seen == {"prepare", "tune-prompt", "train-lora", "attention", "generate"}


@pytest.mark.parametrize("pipeline", ["edit", "batch"])
def test_local_variant_has_no_kubernetes_settings(compiled, pipeline):
    spec, platform = load(compiled[(pipeline, None, False)])
    assert not k8s_executors(platform)
    for ex in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in ex["container"].get("resources", {})
    # No retries locally: kfp.local honours them, and a local failure is rarely transient.
    assert "retryPolicy" not in yaml.safe_dump(spec)


def _artifact_edges(spec: dict) -> list[tuple[str, str, tuple | None]]:
    """(consumer component, input name, (producer component, output key)) for every container task, following
    artifacts through nested DAGs (condition branches, loops, sub-pipelines)."""
    comps = spec["components"]
    edges = []

    def walk(dag: dict, resolve_input) -> None:
        tasks = dag["tasks"]

        def source(ispec: dict):
            if "taskOutputArtifact" in ispec:
                prod = tasks[ispec["taskOutputArtifact"]["producerTask"]]
                return component_of(prod["componentRef"]["name"]), ispec["taskOutputArtifact"]["outputArtifactKey"]
            return resolve_input(ispec["componentInputArtifact"])

        for task in tasks.values():
            comp = comps[task["componentRef"]["name"]]
            arts = task.get("inputs", {}).get("artifacts", {})
            if "dag" in comp:
                resolved = {name: source(ispec) for name, ispec in arts.items()}
                walk(comp["dag"], lambda n, r=resolved: r.get(n))
            else:
                for name, ispec in arts.items():
                    edges.append((component_of(task["componentRef"]["name"]), name, source(ispec)))

    walk(spec["root"]["dag"], lambda n: ("<pipeline input>", n))
    return edges


EDIT_EDGES = {
    ("tune-prompt", "case", ("prepare", "case")),
    ("train-lora", "case", ("prepare", "case")),
    ("train-lora", "prompt_embedding", ("tune-prompt", "prompt_embedding")),
    ("attention", "case", ("prepare", "case")),
    ("mask", "case", ("prepare", "case")),
    ("mask", "attention_map", ("attention", "attention_map")),
    ("generate", "case", ("prepare", "case")),
    ("generate", "prompt_embedding", ("tune-prompt", "prompt_embedding")),
    ("generate", "lora", ("train-lora", "lora")),
    ("generate", "edit_mask", ("mask", "edit_mask")),
    ("summarize", "case", ("prepare", "case")),
    ("summarize", "edited", ("generate", "edited")),
    ("summarize", "edit_mask", ("mask", "edit_mask")),
    ("summarize", "attention_map", ("attention", "attention_map")),
}
FUSED_EDGES = {("summarize", key, ("fused-edit", key)) for key in ("case", "edited", "edit_mask", "attention_map")}


def test_artifacts_wired_stage_to_stage(compiled):
    spec, _ = load(compiled[("edit", "gke-l4", False)])
    edges = _artifact_edges(spec)
    assert set(edges) == EDIT_EDGES
    # Three mode branches: generate and summary with a mask (auto, mask), without one (whole).
    assert sum(1 for c, n, _ in edges if (c, n) == ("generate", "edit_mask")) == 2
    assert sum(1 for c, n, _ in edges if (c, n) == ("generate", "case")) == 3
    assert sum(1 for c, n, _ in edges if (c, n) == ("summarize", "edited")) == 3
    assert sum(1 for c, n, _ in edges if (c, n) == ("mask", "attention_map")) == 1  # auto only
    assert sum(1 for c, n, _ in edges if (c, n) == ("mask", "case")) == 2  # auto and mask


def test_fused_wiring(compiled):
    spec, _ = load(compiled[("edit", "eks-p4d", True)])
    assert set(_artifact_edges(spec)) == FUSED_EDGES
    outputs = spec["components"]["comp-fused-edit"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()} == {
        "case": "system.Dataset", "prompt_embedding": "system.Model", "lora": "system.Model",
        "attention_map": "system.Artifact", "edit_mask": "system.Artifact", "edited": "system.Artifact"}


def test_typed_artifacts(compiled):
    spec, _ = load(compiled[("edit", None, False)])
    comps = spec["components"]

    def outs(comp):
        return {k: v["artifactType"]["schemaTitle"] for k, v in
                comps[comp].get("outputDefinitions", {}).get("artifacts", {}).items()}

    assert outs("comp-prepare") == {"case": "system.Dataset"}
    assert outs("comp-tune-prompt") == {"prompt_embedding": "system.Model"}
    assert outs("comp-train-lora") == {"lora": "system.Model"}
    assert outs("comp-attention") == {"attention_map": "system.Artifact"}
    assert outs("comp-mask") == {"edit_mask": "system.Artifact"}
    assert outs("comp-generate") == {"edited": "system.Artifact"}
    assert outs("comp-summarize") == {"summary": "system.Artifact", "report": "system.HTML",
                                      "report_md": "system.Markdown", "metrics": "system.Metrics"}


def test_mode_branches(compiled):
    spec, _ = load(compiled[("edit", None, False)])
    (group,) = [c for name, c in spec["components"].items() if name.startswith("comp-condition-branches")]
    conditions = {t["taskInfo"]["name"]: t["triggerPolicy"]["condition"] for t in group["dag"]["tasks"].values()}
    is_auto = "inputs.parameter_values['pipelinechannel--mode'] == 'auto'"
    is_mask = "inputs.parameter_values['pipelinechannel--mode'] == 'mask'"
    assert conditions == {"mode-auto": is_auto, "mode-mask": f"!({is_auto}) && {is_mask}",
                          "mode-whole": f"!({is_auto}) && !({is_mask})"}
    # The pipeline's output is the summary of whichever branch ran (dsl.OneOf).
    assert spec["root"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "STRING"


def test_retries_and_caching(compiled):
    spec, _ = load(compiled[("edit", "gke-a100", False)])
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    seen = set()
    for task in tasks.values():
        comp = component_of(task["componentRef"]["name"])
        if comp.startswith("condition"):
            continue
        seen.add(comp)
        # bad input is caught by check-case on a CPU: never retried; the rest is retried (transient failures)
        if comp == "check-case":
            assert "retryPolicy" not in task
        else:
            assert task["retryPolicy"]["maxRetryCount"] == PROFILES["gke-a100"].retries
        # check-case reads URIs, summarize publishes: never cached; prepare is keyed by the content key, the
        # stages after it by their inputs.
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (comp not in ("check-case", "summarize")), comp
    assert seen == {"check-case", "prepare", "tune-prompt", "train-lora", "attention", "mask", "generate",
                    "summarize"}
    prep = spec["root"]["dag"]["tasks"]["prepare"]
    key = prep["inputs"]["parameters"]["content_key"]["taskOutputParameter"]
    assert key == {"outputParameterKey": "Output", "producerTask": "check-case"}


@pytest.mark.parametrize("pipeline", ["edit", "batch", "piebench"])
def test_threshold_parameter_defaults_to_the_presets(compiled, pipeline):
    """A number (kfp.local cannot run an unset optional parameter), negative by default: the preset's."""
    from editinfinity.runtime import UNSET_THRESHOLD, mask_threshold

    spec, _ = load(compiled[(pipeline, "gke-a100", False)])
    param = spec["root"]["inputDefinitions"]["parameters"]["threshold"]
    assert param["parameterType"] == "NUMBER_DOUBLE" and param["defaultValue"] == UNSET_THRESHOLD
    assert mask_threshold(param["defaultValue"]) is None and mask_threshold(0.0) == 0.0


def test_batch_fan_out(compiled):
    spec, platform = load(compiled[("batch", "eks-p4d", False)])
    root = spec["root"]["dag"]["tasks"]
    loop_name, loop = next((k, t) for k, t in root.items() if t["componentRef"]["name"].startswith("comp-for-loop"))
    assert loop["parameterIterator"]["items"]["inputParameter"].startswith("pipelinechannel--batch-plan-Output")
    assert loop["iteratorPolicy"]["parallelismLimit"] == PROFILES["eks-p4d"].parallelism
    (worker,) = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
    assert component_of(worker["componentRef"]["name"]) == "batch-worker"
    assert worker["inputs"]["artifacts"]["plan"]["componentInputArtifact"].endswith("batch-plan-plan")
    # the summary runs whatever the workers did, and reads the plan (plus the counts of the workers that finished)
    summary = root["batch-summary"]
    assert summary["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert set(summary["dependentTasks"]) == {loop_name, "batch-plan"}
    assert summary["inputs"]["parameters"]["results"]["taskOutputParameter"]["producerTask"] == loop_name
    # bad input is not retried: the plan step fails at once; a worker catches bad cases itself
    assert "retryPolicy" not in root["batch-plan"]
    prof = PROFILES["eks-p4d"]
    policy = worker["retryPolicy"]
    assert policy["maxRetryCount"] == prof.retries
    # Argo's retry window counts from the first attempt: it outlasts every attempt at the pod deadline
    assert int(policy["backoffMaxDuration"].rstrip("s")) >= (prof.retries + 1) * prof.worker_timeout
    assert platform["platforms"]["kubernetes"]["pipelineConfig"]["resourceTtlOnCompletion"] == \
        prof.ttl_seconds_after_finished
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["learned_cache"]["defaultValue"] == f"{prof.model_cache_path}/learned"
    assert params["shards"]["defaultValue"] == prof.parallelism


def test_worker_profile_options(tmp_path):
    extra = tmp_path / "spot.yaml"
    extra.write_text(yaml.safe_dump({"profiles": {"gke-l4-spot": {
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "worker_gpus": 2, "timeouts": {"worker": 3600, "stage": 600},
        "spot": {"node_selector": {"cloud.google.com/gke-spot": "true"},
                 "tolerations": [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                                  "effect": "NoSchedule"}]},
        "local_weights": {"size": "40Gi"}, "active_deadline_seconds": 86400}}}))
    spec, platform = load(kfp_cli.compile_pipeline("batch", "gke-l4-spot", tmp_path, profiles_files=[extra]))
    cfg = k8s_executors(platform)["exec-batch-worker"]
    assert cfg["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4",
                                             "cloud.google.com/gke-spot": "true"}
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} \
        in cfg["tolerations"]
    assert cfg["emptyDirMounts"] == [{"volumeName": "local-weights", "mountPath": "/local-weights",
                                      "sizeLimit": "40Gi"}]
    assert cfg["activeDeadlineSeconds"] == "3600"
    res = spec["deploymentSpec"]["executors"]["exec-batch-worker"]["container"]["resources"]
    per_gpu = load_profiles([extra])["gke-l4-spot"].gpu  # the defaults: 8 CPUs, 48Gi per GPU
    assert (per_gpu.cpu, per_gpu.memory) == ("8", "48Gi")
    assert res["accelerator"]["resourceCount"] == "2"
    assert (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == ("16", "96Gi")  # per GPU, twice
    assert platform["platforms"]["kubernetes"]["pipelineConfig"]["activeDeadlineSeconds"] == 86400
    loop = next(c for n, c in spec["components"].items() if n.startswith("comp-for-loop"))
    (worker,) = loop["dag"]["tasks"].values()
    consts = {k: v.get("runtimeValue", {}).get("constant") for k, v in worker["inputs"]["parameters"].items()}
    assert consts["processes"] == 2 and consts["local_weights"] == "/local-weights"


def test_batch_parallelism_override(tmp_path):
    spec, _ = load(kfp_cli.compile_pipeline("batch", "gke-l4", tmp_path, parallelism=2))
    loop = next(t for t in spec["root"]["dag"]["tasks"].values() if "iteratorPolicy" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2


@pytest.mark.parametrize("profile, pipeline, fused", VARIANTS + [(None, "edit", False), (None, "batch", False)])
def test_strict_protobuf_parse(compiled, profile, pipeline, fused):
    spec, platform = load(compiled[(pipeline, profile, fused)])
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # unknown keys raise ParseError
    if profile is None:
        assert not platform
        return
    ps = json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    executors = ps.platforms["kubernetes"].deployment_spec.executors
    assert set(executors) == set(k8s_executors(platform)) <= set(spec["deploymentSpec"]["executors"])
    for name in executors:
        json_format.ParseDict(json_format.MessageToDict(executors[name]),
                              kubernetes_executor_config_pb2.KubernetesExecutorConfig())


def test_compiling_twice_gives_identical_bytes(tmp_path):
    for pipeline, profile, fused in [("edit", "gke-a100", False), ("batch", "on-prem", False)]:
        a = kfp_cli.compile_pipeline(pipeline, profile, tmp_path / "a", fused=fused)
        b = kfp_cli.compile_pipeline(pipeline, profile, tmp_path / "b", fused=fused)
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_no_pip_install_in_commands(compiled):
    for key in [("edit", None, False), ("edit", "eks-p4d", True), ("batch", "gke-l4", False)]:
        spec, _ = load(compiled[key])
        for name, ex in spec["deploymentSpec"]["executors"].items():
            command = " ".join(ex["container"]["command"] + ex["container"].get("args", []))
            assert "pip install" not in command and "pip3 install" not in command, name
            assert ex["container"]["command"][:2] == ["sh", "-ec"], name


def test_profiles_extension_file(tmp_path, monkeypatch):
    extra = tmp_path / "mine.yaml"
    extra.write_text(yaml.safe_dump({
        "profiles": {
            "gke-l4": {"gpu_resources": {"cpu": "6", "memory": "20Gi"}},
            "my-h100": {"node_selector": {"gpu": "h100"},
                        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                        "env": {"EXTRA": "1"}},
        }}))
    monkeypatch.setenv("EDITINFINITY_PROFILES", str(extra))
    profiles = load_profiles()
    assert profiles["gke-l4"].gpu.memory == "20Gi"
    assert profiles["gke-l4"].node_selector == PROFILES["gke-l4"].node_selector  # untouched keys kept
    assert profiles["my-h100"].env["EXTRA"] == "1" and profiles["my-h100"].env["HF_HUB_OFFLINE"] == "1"
    path = kfp_cli.compile_pipeline("edit", "my-h100", tmp_path)
    spec, platform = load(path)
    cfg = k8s_executors(platform)["exec-generate"]
    assert cfg["nodeSelector"]["labels"] == {"gpu": "h100"}
    assert cfg["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]


@pytest.mark.parametrize("body, message", [
    ({"gpu": 1}, "unknown keys"),
    ({"tolerations": [{"key": "a", "operator": "Exist"}]}, "operator"),
    ({"tolerations": [{"key": "a", "operator": "Exists", "effect": "NoSchedul"}]}, "effect"),
    ({"accelerator": {"type": "nvidia.com/gpu", "count": 0}}, "accelerator.count"),
    ({"gpu_resources": {"cpu": "4"}}, "gpu_resources"),
])
def test_bad_profiles_are_rejected(tmp_path, body, message):
    extra = tmp_path / "bad.yaml"
    extra.write_text(yaml.safe_dump({"profiles": {"bad": body}}))
    with pytest.raises(ProfileError, match=message):
        load_profiles([extra])


def test_unknown_profile_lists_known_ones(tmp_path):
    with pytest.raises(ProfileError, match="gke-a100"):
        kfp_cli.compile_pipeline("edit", "nope", tmp_path)


def test_cli_compile(tmp_path, capsys):
    from editinfinity.cli import main

    assert main(["pipeline", "compile", "edit", "--profile", "on-prem", "--fused", "--out", str(tmp_path)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "edit-fused-on-prem.yaml" and path.is_file()
    assert main(["pipeline", "compile", "batch", "--fused", "--out", str(tmp_path)]) == 2
    assert "no fused variant" in capsys.readouterr().err
    assert main(["pipeline", "compile", "edit", "--profile", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_images_by_digest(tmp_path):
    """CI compiles against the digests of the images it pushed; a malformed digest is refused at compile time."""
    import os
    import subprocess
    import sys

    gpu = "ghcr.io/me/editinfinity@sha256:" + "a" * 64
    cpu = "ghcr.io/me/editinfinity@sha256:" + "b" * 64
    env = {**os.environ, "EDITINFINITY_IMAGE": gpu, "EDITINFINITY_CPU_IMAGE": cpu}
    proc = subprocess.run([sys.executable, "-m", "editinfinity.cli", "pipeline", "compile", "batch", "--profile",
                           "gke-l4", "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    spec, _ = load(tmp_path / "batch-gke-l4.yaml")
    images = {component_of(n): ex["container"]["image"] for n, ex in spec["deploymentSpec"]["executors"].items()}
    assert images == {"batch-plan": cpu, "batch-worker": gpu, "batch-summary": cpu}
    env["EDITINFINITY_IMAGE"] = "ghcr.io/me/editinfinity@sha256:abc"
    proc = subprocess.run([sys.executable, "-m", "editinfinity.cli", "pipeline", "compile", "edit", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not an image reference by digest" in proc.stderr
    assert "Traceback" not in proc.stderr
