"""The pipelines run end to end under ``kfp.local`` with the stage functions STUBBED.

What this shows: our wiring works as KFP executes it (artifact passing between pods' folders, the mode branches,
optional inputs, ``dsl.OneOf``, ParallelFor + Collected, metadata timings, the fused split), the components call
the stage functions with the arguments we expect, inputs are fetched and outputs published through
``editinfinity.storage`` (real module: local paths, and moto S3 in the integration test).
What it does not show: that the real stages work; ``tests/test_components.py`` (marked slow) runs those.

The stubs are injected only into the component subprocesses, by a ``sitecustomize`` on ``PYTHONPATH`` that maps
``editinfinity.edit.stages`` and ``editinfinity.models.bundle`` to small files written by this test.
"""

import json
import re
from pathlib import Path

import kfp_stubs
import pytest

from editinfinity import runtime
from editinfinity.batch import cases as batch_cases
from pipelines import cli as kfp_cli
from pipelines.cli import PipelineRunError

ROOT = Path(__file__).resolve().parents[2]

STUB_STAGES = '''
"""Stand-ins for editinfinity.edit.stages: same signatures, tiny files, every call logged as one JSON line."""
import hashlib, json, os, shutil
from pathlib import Path

def _log(stage, **kw):
    def plain(v):
        if hasattr(v, "to_dict"):
            return v.to_dict()
        return v if isinstance(v, (str, int, float, bool, type(None), dict, list)) else str(v)
    line = json.dumps({"stage": stage, **{k: plain(v) for k, v in kw.items()}}, sort_keys=True) + "\\n"
    with open(os.environ["EDITINFINITY_STUB_LOG"], "a") as f:
        f.write(line)

def _stage_dir(out_dir, stage, run_id, files):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    (out / "stage.json").write_text(json.dumps({"format": "editinfinity-stage/1", "stage": stage,
                                                "run_id": run_id, "seconds": 0.25}))
    return out

def _run_id(case_dir):
    return json.loads((Path(case_dir) / "stage.json").read_text())["run_id"]

def _check(stage_dir, stage):
    assert json.loads((Path(stage_dir) / "stage.json").read_text())["stage"] == stage, (stage_dir, stage)

def prepare(out_dir, *, image, prompt, edit_prompt, mode="auto", target_word=None, mask=None,
            mask_polarity="white-edit", resolution=None, preset=None, models=None, overwrite=False):
    _log("prepare", out_dir=str(out_dir), image=image, prompt=prompt, edit_prompt=edit_prompt, mode=mode,
         target_word=target_word, mask=mask, mask_polarity=mask_polarity, resolution=resolution, preset=preset,
         models=models, image_exists=os.path.isfile(image))
    if mode not in ("auto", "mask", "whole"):
        raise ValueError(f"bad mode {mode}")
    run_id = hashlib.sha256((prompt + edit_prompt).encode()).hexdigest()[:12]
    out = _stage_dir(out_dir, "prepare", run_id, {"case.json": json.dumps(
        {"spec": {"mode": mode, "prompt": prompt, "edit_prompt": edit_prompt, "target_word": target_word}})})
    shutil.copyfile(image, out / "image.png")
    return out

def tune_prompt(case_dir, out_dir, *, iters=10, seed=0, models=None):
    _check(case_dir, "prepare")
    _log("tune_prompt", iters=iters, seed=seed, models=models)
    return _stage_dir(out_dir, "tune_prompt", _run_id(case_dir), {"prompt_embedding.safetensors": "rows"})

def train_lora(case_dir, prompt_dir, out_dir, *, iters=50, seed=0, models=None):
    _check(prompt_dir, "tune_prompt")
    _log("train_lora", iters=iters, seed=seed, models=models)
    return _stage_dir(out_dir, "train_lora", _run_id(case_dir), {"adapter_model.safetensors": "lora"})

def attention(case_dir, out_dir, *, models=None):
    _log("attention", models=models)
    return _stage_dir(out_dir, "attention", _run_id(case_dir), {"attention.png": "att"})

def make_mask(case_dir, out_dir, *, attention_dir=None, threshold=None):
    if attention_dir is not None:
        _check(attention_dir, "attention")
    _log("make_mask", attention_dir=attention_dir is not None, threshold=threshold)
    return _stage_dir(out_dir, "mask", _run_id(case_dir), {"mask.png": "mask", "weights.png": "w"})

def generate(case_dir, prompt_dir, lora_dir, out_dir, *, mask_dir=None, seed=0, models=None):
    _check(lora_dir, "train_lora")
    if mask_dir is not None:
        _check(mask_dir, "mask")
    _log("generate", mask_dir=mask_dir is not None, seed=seed, models=models)
    return _stage_dir(out_dir, "generate", _run_id(case_dir), {"edited.png": "edited", "reconstruction.png": "r"})

def summarize(out_dir, *, case_dir, generate_dir, mask_dir=None, attention_dir=None, timings=None, **kw):
    _check(generate_dir, "generate")
    _log("summarize", mask_dir=mask_dir is not None, attention_dir=attention_dir is not None, timings=timings)
    case = json.loads((Path(case_dir) / "case.json").read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(generate_dir) / "edited.png", out / "edited.png")
    (out / "report.html").write_text("<html>stub report</html>")
    psnr = {"auto": 31.5, "mask": 32.5, "whole": 33.5}[case["spec"]["mode"]]  # one per case, to follow it
    (out / "summary.json").write_text(json.dumps({"spec": case["spec"], "metrics": {"psnr": psnr, "ssim": 0.93},
                                                  "seconds": timings or {}}))
    return out

def run_edit(out_dir, *, image, prompt, edit_prompt, mode="auto", target_word=None, mask=None,
             mask_polarity="white-edit", resolution=None, preset=None, weights=None, device=None, models=None,
             models_loader=None, settings=None, overwrite=False, progress=True):
    models = models if models is not None else models_loader()  # the real run_edit times this as load_models
    _log("run_edit", mode=mode, settings=settings, models=models, progress=progress)
    st = Path(out_dir) / "stages"
    case = prepare(st / "case", image=image, prompt=prompt, edit_prompt=edit_prompt, mode=mode,
                   target_word=target_word, mask=mask, models=models)
    prompt_dir = tune_prompt(case, st / "prompt", iters=settings.prompt_iters, seed=settings.seed, models=models)
    lora = train_lora(case, prompt_dir, st / "lora", iters=settings.lora_iters, seed=settings.seed, models=models)
    att = attention(case, st / "attention", models=models) if mode == "auto" else None
    mask_dir = make_mask(case, st / "mask", attention_dir=att) if mode != "whole" else None
    gen = generate(case, prompt_dir, lora, st / "generate", mask_dir=mask_dir, seed=settings.seed, models=models)
    summarize(out_dir, case_dir=case, generate_dir=gen, mask_dir=mask_dir, attention_dir=att,
              timings={"load_models": 1.5, "prepare": 0.25, "total": 2.0})
    return Path(out_dir)
'''


@pytest.fixture
def stubbed(tmp_path, monkeypatch) -> Path:
    """Stub stages for the component subprocesses; returns the call log path."""
    kfp_stubs.install(tmp_path / "stub", monkeypatch, {"editinfinity.models.bundle": kfp_stubs.STUB_BUNDLE,
                                                       "editinfinity.edit.stages": STUB_STAGES})
    log = tmp_path / "calls.jsonl"
    log.touch()
    monkeypatch.setenv("EDITINFINITY_STUB_LOG", str(log))
    monkeypatch.setenv("EDITINFINITY_CACHE", str(tmp_path / "cache"))
    return log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def source_image(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (320, 240), (120, 130, 140)).save(path)  # large enough for the budget (check-case checks)
    return path


CASE = {"prompt": "a red circle on a gray background", "edit_prompt": "a green circle on a gray background"}


def test_fused_run_splits_artifacts_and_skips_what_the_mode_skips(stubbed, tmp_path):
    image = source_image(tmp_path / "in" / "src.png")
    mask = source_image(tmp_path / "in" / "mask.png")
    run = kfp_cli.run_local("edit", pipeline_root=tmp_path / "root", fused=True, image_uri=str(image), **CASE,
                            mode="mask", mask_uri=str(mask), preset="tiny", prompt_iters=4, lora_iters=6, seed=3,
                            threshold=0.4, output_uri=str(tmp_path / "out"))
    assert run.output["spec"]["mode"] == "mask" and run.output["output_uri"] == str(tmp_path / "out")
    log = calls(stubbed)
    (fused,) = [c for c in log if c["stage"] == "run_edit"]
    assert fused["settings"]["prompt_iters"] == 4 and fused["settings"]["lora_iters"] == 6
    assert fused["settings"]["seed"] == 3 and fused["settings"]["threshold"] == 0.4
    assert fused["models"] == {"preset": "tiny", "weights": None, "text_encoder": True} and fused["progress"] is False
    inner, summary = [c for c in log if c["stage"] == "summarize"]  # run_edit's own, then the KFP summary step
    assert summary["mask_dir"] is True and summary["attention_dir"] is False  # attention skipped in mode mask
    assert summary["timings"]["load_models"] == 1.5  # run_edit's timings reach the KFP summary
    task_dir = next(run.run_dir.glob("fused-edit"))
    assert json.loads((task_dir / "attention_map" / "skipped.json").read_text())["skipped"] is True
    for name in ("case", "prompt_embedding", "lora", "edit_mask", "edited"):
        assert (task_dir / name / "stage.json").is_file(), name
    assert not list(task_dir.glob(".fused-*")), "the work folder is cleaned up"
    assert (tmp_path / "out" / "stages" / "mask").is_dir()


def test_failing_stage_reports_the_task(stubbed, tmp_path):
    image = source_image(tmp_path / "src.png")
    with pytest.raises(PipelineRunError, match="check-case") as err:
        kfp_cli.run_local("edit", pipeline_root=tmp_path / "root", image_uri=str(image), **CASE, mode="sideways")
    assert "\x1b[" not in str(err.value)


def test_threshold_unset_reaches_the_mask_stage_as_the_presets(stubbed, tmp_path):
    """The pipeline's default threshold (-1) reaches the mask stage as None (the case's preset's); a given one as
    given. The content key keys the threshold as given: unset and an explicit 0.5 never share a key."""
    import components

    image = source_image(tmp_path / "in" / "src.png")
    common = dict(image_uri=str(image), **CASE, mode="auto", target_word="circle", preset="toy")
    kfp_cli.run_local("edit", pipeline_root=tmp_path / "root", **common)
    kfp_cli.run_local("edit", pipeline_root=tmp_path / "root2", **common, threshold=0.45)
    assert [c["threshold"] for c in calls(stubbed) if c["stage"] == "make_mask"] == [None, 0.45]

    inputs = dict(image_uri=str(image), **CASE, mode="auto", target_word="circle", mask_uri="",
                  mask_polarity="white-edit", resolution="", preset="toy", weights="")
    key = {t: components.check_case.python_func(**inputs, prompt_iters=1, lora_iters=1, seed=0, threshold=t)
           for t in (-1.0, 0.5)}
    assert key[-1.0] != key[0.5]
    assert key[-1.0] == runtime.case_content_key(**inputs, settings={"prompt_iters": 1, "lora_iters": 1, "seed": 0,
                                                                     "threshold": None})


def test_edit_through_s3_on_moto(stubbed, tmp_path, monkeypatch):
    """Input image and weights by s3:// URI, outputs published to s3:// (moto on 127.0.0.1)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="edits")
        s3.upload_file(str(source_image(tmp_path / "src.png")), "edits", "in/src.png")
        weights = tmp_path / "weights"
        weights.mkdir()
        (weights / "model_index.json").write_text("{}")
        from editinfinity import storage

        storage.publish_dir(weights, "s3://edits/models/infinity-2b")
        run = kfp_cli.run_local("edit", pipeline_root=tmp_path / "root", image_uri="s3://edits/in/src.png", **CASE,
                                mode="auto", target_word="circle", preset="2b",
                                weights="s3://edits/models/infinity-2b", output_uri="s3://edits/out/case-1")
        assert run.output["output_uri"] == "s3://edits/out/case-1"
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="edits", Prefix="out/case-1/")["Contents"]}
        assert {"out/case-1/_MANIFEST.json", "out/case-1/report.html", "out/case-1/summary.json",
                "out/case-1/stages/generate/edited.png", "out/case-1/stages/attention/attention.png"} <= keys
        log = calls(stubbed)
        (prep,) = [c for c in log if c["stage"] == "prepare"]
        assert prep["image_exists"] and prep["image"].endswith("src.png")
        # Weights by URI are fetched into the cache directory and handed to load_models as a local folder.
        cached = {c["models"]["weights"] for c in log if isinstance(c.get("models"), dict)}
        assert len(cached) == 1
        (local_weights,) = cached
        assert local_weights.startswith(str(tmp_path / "cache")) and Path(local_weights, "model_index.json").is_file()
    finally:
        server.stop()


# -- runtime helpers, in-process --------------------------------------------------------------------------------


def test_parse_cases_normalises_and_resolves_paths():
    text = "\n".join([
        "# comment",
        json.dumps({"image": "img/a.png", **CASE, "target_word": "circle"}),
        "",
        json.dumps({"id": "b", "image": "gs://other/b.png", **CASE, "mask": "m/b.png"}),
        json.dumps({"image": "c.png", **CASE}),
    ])
    cases = batch_cases.parse_cases(text, cases_uri="s3://bucket/batch/cases.jsonl", output_uri="s3://bucket/out/")
    assert [c["id"] for c in cases] == ["case-0000", "b", "case-0002"]
    assert [c["mode"] for c in cases] == ["auto", "mask", "whole"]
    assert cases[0]["image"] == "s3://bucket/batch/img/a.png"
    assert cases[1]["image"] == "gs://other/b.png" and cases[1]["mask"] == "s3://bucket/batch/m/b.png"
    assert cases[1]["output_uri"] == "s3://bucket/out/b"
    assert all(isinstance(v, str) for c in cases for v in c.values())


@pytest.mark.parametrize("lines, message", [
    (["{not json"], "line 1: not JSON"),
    ([json.dumps({"image": "a", "prompt": "p"})], "missing edit_prompt"),
    ([json.dumps({"image": "a", **CASE, "colour": "red"})], "unknown keys"),
    ([json.dumps({"id": "x y", "image": "a", **CASE})], "id 'x y'"),
    ([json.dumps({"id": "x", "image": "a", **CASE})] * 2, "line 2: duplicate id"),
    ([json.dumps({"image": "a", **CASE, "mode": "most"})], "mode must be"),
    (["", "# only comments"], "no cases"),
])
def test_parse_cases_errors_name_the_line(lines, message):
    from editinfinity.errors import InvalidCaseError

    with pytest.raises(InvalidCaseError, match=re.escape(message)):
        batch_cases.parse_cases("\n".join(lines), cases_uri="cases.jsonl")


def test_summary_metrics():
    assert runtime.summary_metrics({"metrics": {"psnr": 30.5, "ssim": 0.9, "region": "x", "ok": True},
                                    "seconds": {"train_lora": 12, "peak_gpu_memory_gb": 4.5}},
                                   {"generate": 3.0}) == {
        "psnr": 30.5, "seconds_generate": 3.0, "seconds_train_lora": 12.0, "ssim": 0.9, "peak_gpu_memory_gb": 4.5}
    text = runtime.summary_markdown({"seconds": {"generate": 3.0, "total": 3.0, "peak_gpu_memory_gb": 4.5}})
    assert "| generate | 3.0 |" in text and "Peak GPU memory: 4.5 GiB" in text
    assert "| peak_gpu_memory_gb |" not in text  # not a time


def test_weights_resolution_passes_local_and_hub_ids_through(tmp_path):
    assert runtime.resolve_weights("") is None
    assert runtime.resolve_weights(str(tmp_path)) == str(tmp_path)
    assert runtime.resolve_weights(f"file://{tmp_path}") == str(tmp_path)
    assert runtime.resolve_weights("someorg/converted-2b") == "someorg/converted-2b"
