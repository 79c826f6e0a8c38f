"""The components over the REAL stages (``editinfinity.edit.stages``, tiny preset, CPU): slow.

1. Each component's ``.python_func`` on artifact objects (no subprocess): files and metadata per stage.
2. A ``kfp.local`` run of the ``edit`` pipeline in each mode (auto, mask, whole) and of the fused variant,
   publishing to a local output folder through ``editinfinity.storage``.
The same wiring with stubbed stages runs fast in ``tests/test_pipeline_local.py``.
"""

import json
from pathlib import Path

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from pipelines import cli as kfp_cli

ROOT = Path(__file__).resolve().parents[2]

import components  # noqa: E402

pytestmark = pytest.mark.slow

CASE = {"prompt": "a red circle on a gray background", "edit_prompt": "a green circle on a gray background"}
MODEL = {"preset": "tiny", "weights": ""}


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A source image (red circle on gray) and a user mask (white = edit) of the same size."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (96, 64), (128, 128, 128))
    ImageDraw.Draw(img).ellipse((30, 12, 62, 44), fill=(210, 40, 40))
    img.save(folder / "source.png")
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle((26, 8, 66, 48), fill=255)
    mask.save(folder / "mask.png")
    return folder / "source.png", folder / "mask.png"


def test_components_python_func_over_real_stages(tmp_path):
    source, _ = write_inputs(tmp_path / "in")
    a = tmp_path / "artifacts"
    case = Dataset(uri=str(a / "case"))
    components.prepare.python_func(image_uri=str(source), **CASE, mode="auto", target_word="circle", mask_uri="",
                                   mask_polarity="white-edit", resolution="", **MODEL, case=case)
    assert (Path(case.path) / "stage.json").is_file()
    assert case.metadata["stage"] == "prepare" and case.metadata["mode"] == "auto"

    prompt = Model(uri=str(a / "prompt"))
    components.tune_prompt.python_func(case=case, iters=1, seed=0, **MODEL, prompt_embedding=prompt)
    assert (Path(prompt.path) / "prompt_embedding.safetensors").is_file()
    assert prompt.metadata["run_id"] == case.metadata["run_id"]

    lora = Model(uri=str(a / "lora"))
    components.train_lora.python_func(case=case, prompt_embedding=prompt, iters=1, seed=0, **MODEL, lora=lora)
    assert (Path(lora.path) / "adapter_config.json").is_file()

    att = Artifact(uri=str(a / "attention"))
    components.attention.python_func(case=case, **MODEL, attention_map=att)
    assert (Path(att.path) / "attention.safetensors").is_file() and (Path(att.path) / "attention.png").is_file()

    edit_mask = Artifact(uri=str(a / "mask"))
    components.mask.python_func(case=case, threshold=0.5, edit_mask=edit_mask, attention_map=att)
    for name in ("mask.png", "weights.safetensors", "weights.png"):
        assert (Path(edit_mask.path) / name).is_file(), name

    edited = Artifact(uri=str(a / "generate"))
    components.generate.python_func(case=case, prompt_embedding=prompt, lora=lora, seed=0, **MODEL, edited=edited,
                                    edit_mask=edit_mask)
    assert (Path(edited.path) / "edited.png").is_file() and (Path(edited.path) / "reconstruction.png").is_file()
    assert set(edited.metadata["timings"]) == {"prepare", "tune_prompt", "train_lora", "mask", "generate"}

    out = tmp_path / "published"
    report, report_md, metrics = HTML(uri=str(a / "report")), Markdown(uri=str(a / "report_md")), Metrics()
    result = components.summarize.python_func(
        case=case, edited=edited, output_uri=str(out), case_id="c1", summary=Artifact(uri=str(a / "summary")),
        report=report, report_md=report_md, metrics=metrics, edit_mask=edit_mask, attention_map=att)
    data = json.loads(result)
    assert data["case_id"] == "c1" and data["output_uri"] == str(out) and data["spec"]["mode"] == "auto"
    assert Path(report.path).read_text().lstrip().lower().startswith("<!doctype html") or "<html" in Path(
        report.path).read_text().lower()
    assert "circle" in Path(report_md.path).read_text()
    assert "seconds_generate" in metrics.metadata and "seconds_attention" in metrics.metadata
    for rel in ("report.html", "summary.json", "edited.png", "_MANIFEST.json", "stages/generate/edited.png",
                "stages/mask/mask.png", "stages/attention/attention.png"):
        assert (out / rel).is_file(), rel


@pytest.mark.parametrize("mode", ["auto", "mask", "whole"])
def test_local_edit_pipeline_each_mode(tmp_path, mode):
    source, mask = write_inputs(tmp_path / "in")
    extra = {"auto": {"target_word": "circle"}, "mask": {"mask_uri": str(mask)}, "whole": {}}[mode]
    out = tmp_path / "out"
    run = kfp_cli.run_local("edit", pipeline_root=tmp_path / "root", image_uri=str(source), **CASE, mode=mode,
                            **extra, **MODEL, prompt_iters=1, lora_iters=1, seed=0, output_uri=str(out))
    assert run.output["spec"]["mode"] == mode and run.output["output_uri"] == str(out)
    assert (out / "edited.png").is_file() and (out / "report.html").is_file()
    assert (out / "stages" / "mask").is_dir() == (mode != "whole")
    assert (out / "stages" / "attention").is_dir() == (mode == "auto")
    assert json.loads((out / "summary.json").read_text())["spec"]["mode"] == mode


def test_local_edit_pipeline_fused(tmp_path):
    source, _ = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    run = kfp_cli.run_local("edit", pipeline_root=tmp_path / "root", fused=True, image_uri=str(source), **CASE,
                            mode="auto", target_word="circle", **MODEL, prompt_iters=1, lora_iters=1,
                            output_uri=str(out))
    assert run.output["spec"]["mode"] == "auto"
    task_dir = run.run_dir / "fused-edit"
    for name in ("case", "prompt_embedding", "lora", "attention_map", "edit_mask", "edited"):
        assert (task_dir / name / "stage.json").is_file(), name
    assert (out / "stages" / "attention" / "attention.png").is_file()
