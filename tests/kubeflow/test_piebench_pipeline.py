"""The ``piebench`` Kubeflow pipeline: compiled spec (scheduling per profile, ParallelFor + Collected into one
scoring step, no caching, strict protobuf parse, determinism), the pod-side helpers in-process (resume, failure
records, CLI-compatible layout) and one ``kfp.local`` run with ``run_edit`` stubbed in the component subprocesses.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # components/ and pipelines/ are top-level folders of the repository
    sys.path.insert(0, str(ROOT))

import kfp_stubs  # noqa: E402  (tests/kfp_stubs.py)

from components import CPU_COMPONENTS, CPU_IMAGE, GPU_COMPONENTS, GPU_IMAGE  # noqa: E402
from editinfinity.edit.settings import EditSettings  # noqa: E402
from editinfinity.errors import EditInfinityError, InvalidCaseError  # noqa: E402
from editinfinity.evaluation import piebench_steps as bk  # noqa: E402
from editinfinity.evaluation.piebench_run import EDITED_FILE, run_piebench  # noqa: E402
from editinfinity.evaluation.toy import build_toy_piebench  # noqa: E402
from pipelines import cli as kfp_cli  # noqa: E402
from pipelines import load_profiles  # noqa: E402

PROFILES = load_profiles()


def component_of(name: str) -> str:
    return re.sub(r"-\d+$", "", re.sub(r"^(exec|comp)-", "", name))


def load(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) == 2 else {})


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return build_toy_piebench(tmp_path_factory.mktemp("toy") / "pie", per_type=1, types=(0, 1, 2))


# ------------------------------------------------------------------------------------------------ compiled spec


@pytest.mark.parametrize("profile", [None, *sorted(PROFILES)])
def test_compiled_scheduling_and_fan_out(tmp_path, profile):
    path = kfp_cli.compile_pipeline("piebench", profile, tmp_path)
    assert path.name == f"piebench-{profile or 'local'}.yaml"
    spec, platform = load(path)
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    k8s = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    seen = set()
    for name, ex in spec["deploymentSpec"]["executors"].items():
        comp = component_of(name)
        seen.add(comp)
        res = ex["container"].get("resources", {})
        assert ex["container"]["command"][:2] == ["sh", "-ec"] and "pip install" not in " ".join(ex["container"]["command"])
        if comp in GPU_COMPONENTS:
            assert ex["container"]["image"] == GPU_IMAGE
            if profile:
                prof = PROFILES[profile]
                assert res["accelerator"]["resourceType"] == prof.accelerator_type
                worker = comp == "piebench-worker"
                assert k8s[name]["nodeSelector"]["labels"] == {**prof.node_selector,
                                                               **(prof.spot_node_selector if worker else {})}
                if prof.model_cache_pvc:  # the metric weights live on the model cache too
                    assert k8s[name]["pvcMount"][0]["mountPath"] == prof.model_cache_path
        else:
            assert comp in CPU_COMPONENTS and ex["container"]["image"] == CPU_IMAGE
            assert "accelerator" not in res and not {"nodeSelector", "tolerations"} & set(k8s.get(name, {}))
        if not profile:
            assert "accelerator" not in res
    assert seen == {"piebench-cases", "piebench-worker", "piebench-score"}
    root = spec["root"]["dag"]["tasks"]
    loop_name, loop = next((k, t) for k, t in root.items() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].startswith("pipelinechannel--piebench-cases-Output")
    assert loop["iteratorPolicy"]["parallelismLimit"] == (PROFILES[profile].parallelism if profile else 4)
    (worker,) = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"].values()
    assert component_of(worker["componentRef"]["name"]) == "piebench-worker"  # one pod per shard, not per case
    score = root["piebench-score"]
    assert score["dependentTasks"] == [loop_name]
    assert score["inputs"]["parameters"]["results"]["taskOutputParameter"]["producerTask"] == loop_name
    tasks = dict(root)
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    for name, task in tasks.items():
        if "componentRef" in task and component_of(task["componentRef"]["name"]).startswith("piebench"):
            assert not task.get("cachingOptions", {}).get("enableCache", False), name
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"data_uri", "output_uri", "mode", "types", "limit", "shards", "clip", "dino", "lpips"} <= set(params)


def test_compile_command_and_determinism(tmp_path, capsys):
    from editinfinity.cli import build_parser

    args = build_parser().parse_args(["pipeline", "compile", "--pipeline", "piebench", "--profile", "gke-l4",
                                      "--out", str(tmp_path / "a")])
    assert args.handler(args) == 0
    first = Path(capsys.readouterr().out.strip())
    assert first.name == "piebench-gke-l4.yaml"
    again = kfp_cli.compile_pipeline("piebench", "gke-l4", tmp_path / "b")
    assert first.read_bytes() == again.read_bytes()
    assert kfp_cli.compile_pipeline("piebench", "gke-l4", tmp_path / "c", parallelism=2).read_text().count(
        "parallelismLimit: 2") == 1
    with pytest.raises(EditInfinityError, match="no fused variant"):
        kfp_cli.compile_pipeline("piebench", None, tmp_path, fused=True)


# ------------------------------------------------------------------------------------------------ pod helpers


class StubEdit:
    """Replaces run_edit inside editinfinity.evaluation.piebench_run.edit_one (its default edit function)."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, out_dir, **kw):
        from PIL import Image

        self.calls.append(Path(kw["image"]).stem)
        if Path(kw["image"]).stem in self.fail:
            raise InvalidCaseError("stub failure")
        out = Path(out_dir)
        out.mkdir(parents=True)
        Image.open(kw["image"]).convert("RGB").resize((256, 256)).save(out / "edited.png")
        (out / "summary.json").write_text(json.dumps({"seconds": {"total": 1.0}}))
        return out


def test_pod_helpers_resume_and_record_failures(toy, tmp_path, monkeypatch):
    import editinfinity.edit.run as run_module

    stub = StubEdit(fail={"100000000000"})
    monkeypatch.setattr(run_module, "run_edit", stub)
    config = bk.bench_config(mode="auto", preset="", weights="", resolution="", prompt_iters=1, lora_iters=1,
                             seed=0, threshold=0.5)
    out = str(tmp_path / "out")
    cases = bk.list_cases(str(toy), out, config, types="0,1,2", limit=0)
    assert cases == [{"id": "000000000000", "edit_type": "0"}, {"id": "100000000000", "edit_type": "1"},
                     {"id": "200000000000", "edit_type": "2"}]
    loads = []
    results = [json.loads(bk.edit_case(str(toy), c["id"], out, config, models_loader=lambda: loads.append(1)))
               for c in cases]
    assert [r["status"] for r in results] == ["done", "failed", "done"] and results[1]["error"] == "stub failure"
    assert json.loads((tmp_path / "out" / "cases" / "100000000000" / "error.json").read_text())["error"] == "stub failure"
    # Again, as one shard worker: finished cases are not edited, the failed one is retried, models load once.
    stub.fail.clear()
    stub.calls.clear()
    shards = bk.shard_cases(cases, 2)
    assert shards == [{"shard": "0", "ids": "000000000000,200000000000"}, {"shard": "1", "ids": "100000000000"}]
    assert bk.shard_cases(cases, 10) == [{"shard": str(i), "ids": c["id"]} for i, c in enumerate(cases)]
    again = json.loads(bk.edit_shard(str(toy), ",".join(c["id"] for c in cases), out, config,
                                     models_loader=lambda: loads.append(1)))
    assert again == {"done": 1, "resumed": 2, "failed": 0} and stub.calls == ["100000000000"] and len(loads) == 4
    fresh, shard_loads = str(tmp_path / "fresh"), []
    bk.list_cases(str(toy), fresh, config, types="0,1,2", limit=0)
    counts = json.loads(bk.edit_shard(str(toy), shards[0]["ids"], fresh, config,
                                      models_loader=lambda: shard_loads.append(1)))
    assert counts == {"done": 2, "resumed": 0, "failed": 0} and len(shard_loads) == 1  # one load per worker
    result = bk.score_all(str(toy), out, config, types="0,1,2", local_dir=tmp_path / "scoring")
    assert result.ok == 3 and result.failed == 0  # the superseded error record is ignored
    for name in ("results.csv", "table.md", "table.html", "summary.json", "grids/type_0.png"):
        assert (tmp_path / "out" / name).is_file(), name
    assert (tmp_path / "out" / "cases" / "000000000000" / "scores.json").is_file()
    metrics = bk.table_metrics(result)
    assert metrics["cases_scored"] == 3 and "mean_psnr" in metrics and "mean_clip_whole" not in metrics
    # The CLI resumes the pipeline's folder (same layout, same bench.json): nothing left to edit.
    cli = run_piebench(str(toy), out, mode="auto", types="0,1,2", settings=EditSettings.from_profile(
        "default", prompt_iters=1, lora_iters=1, seed=0, threshold=0.5), edit_fn=StubEdit(), models="m", progress=False)
    assert cli.resumed == 3 and cli.edited == 0 and cli.ok == 3
    # Other settings are refused before anything runs.
    other = bk.bench_config(mode="mask", preset="", weights="", resolution="", prompt_iters=1, lora_iters=1,
                            seed=0, threshold=0.5)
    with pytest.raises(InvalidCaseError, match="other settings"):
        bk.list_cases(str(toy), out, other)
    with pytest.raises(InvalidCaseError, match="output_uri"):
        bk.list_cases(str(toy), "", config)
    with pytest.raises(InvalidCaseError, match="no well-formed"):
        bk.list_cases(str(toy), str(tmp_path / "x"), config, types="9")


def test_an_unset_threshold_is_recorded_and_compared_as_the_presets(toy, tmp_path):
    """The pipelines' threshold -1 means the preset's: bench.json and the table record the number, and a resumed run
    is compared on it (tiny: unset = the method's 0.5, the same edits; toy: unset = its own, other edits)."""
    from editinfinity.models.presets import mask_threshold_for

    def config(preset: str, threshold: float) -> bk.BenchConfig:
        return bk.bench_config(mode="auto", preset=preset, weights="", resolution="", prompt_iters=1, lora_iters=1,
                               seed=0, threshold=threshold)

    for preset in ("tiny", "toy"):
        unset = config(preset, -1.0)
        assert unset.settings.threshold is None
        assert unset.to_dict()["settings"]["threshold"] == mask_threshold_for(preset)
        out = str(tmp_path / preset)
        bk.list_cases(str(toy), out, config(preset, 0.5), types="0", limit=0)
        if mask_threshold_for(preset) == 0.5:
            bk.list_cases(str(toy), out, unset, types="0", limit=0)  # the same edits: resumable
        else:
            with pytest.raises(InvalidCaseError, match=r"threshold \(0\.5 -> "):
                bk.list_cases(str(toy), out, unset, types="0", limit=0)
    assert mask_threshold_for("toy") != mask_threshold_for("tiny")  # both branches above ran


# ------------------------------------------------------------------------------------------------ kfp.local

STUB_RUN = '''
import json, os
from pathlib import Path
from PIL import Image

def run_edit(out_dir, *, image, prompt, edit_prompt, mode, target_word=None, mask=None, mask_polarity="white-edit",
             resolution=None, preset=None, weights=None, device=None, models=None, settings=None, overwrite=False,
             progress=True):
    with open(os.environ["PIEBENCH_STUB_LOG"], "a") as f:
        f.write(json.dumps({"image": Path(image).stem, "mode": mode, "target_word": target_word,
                            "models": models, "lora_iters": settings.lora_iters}) + "\\n")
    out = Path(out_dir)
    out.mkdir(parents=True)
    Image.open(image).convert("RGB").resize((256, 256)).save(out / "edited.png")
    (out / "summary.json").write_text(json.dumps({"seconds": {"total": 2.0}}))
    return out
'''

def test_local_run_edits_and_scores(toy, tmp_path, monkeypatch):
    kfp_stubs.install(tmp_path / "stub", monkeypatch, {"editinfinity.edit.run": STUB_RUN,
                                                       "editinfinity.models.bundle": kfp_stubs.STUB_BUNDLE})
    log = tmp_path / "calls.jsonl"
    log.touch()
    monkeypatch.setenv("PIEBENCH_STUB_LOG", str(log))
    out = tmp_path / "out"
    kfp_cli.run_local("piebench", pipeline_root=tmp_path / "root", data_uri=str(toy), output_uri=str(out),
                      mode="auto", types="1", preset="tiny", prompt_iters=1, lora_iters=2)
    (call,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert call.pop("target_word") and call == {"image": "100000000000", "mode": "auto", "lora_iters": 2,
                                                "models": {"preset": "tiny", "weights": None,
                                                           "text_encoder": True}}
    assert (out / "cases" / "100000000000" / EDITED_FILE).is_file()
    table = (out / "table.md").read_text()
    assert "| 1 change object | 1 (1) | n/c |" in table and "preset `tiny`" in table and "LoRA 2 updates" in table
    assert json.loads((out / "bench.json").read_text())["config"]["settings"]["lora_iters"] == 2
