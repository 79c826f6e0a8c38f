"""End to end on the tiny preset (CPU): the CLI as a user calls it, stage by stage, properties of the method,
and bad input (clear message, non-zero exit, no traceback, nothing left in --out)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from editinfinity.cli import main
from editinfinity.edit.case import CaseSpec
from editinfinity.edit.generate import generate_edit
from editinfinity.edit.prepare import prepare_case
from editinfinity.edit.settings import EditSettings
from editinfinity.models.bundle import load_models
from editinfinity.toyworld import Scene, Shape, caption, render, render_mask

FAST = ["--prompt-iters", "2", "--lora-iters", "2", "--preset", "tiny", "-q"]


@pytest.fixture(scope="module")
def wide_case(tmp_path_factory) -> dict:
    """A non-square (320x256, h/w 0.8) scene with its mask."""
    d = tmp_path_factory.mktemp("wide")
    scene = Scene("white", (Shape("triangle", "purple", 90, 120, 100), Shape("circle", "orange", 230, 140, 90)),
                  width=320, height=256)
    render(scene).save(d / "image.png")
    Image.fromarray((render_mask(scene, 1) * 255).astype(np.uint8)).save(d / "mask.png")
    prompt = caption(scene)
    return {"image": str(d / "image.png"), "mask": str(d / "mask.png"), "prompt": prompt,
            "edit_prompt": prompt.replace("orange circle", "green circle"), "target_word": "circle"}


@pytest.fixture(scope="module")
def models():
    return load_models("tiny", device="cpu")


def _cli(*args: str) -> int:
    return main([*map(str, args)])


@pytest.mark.parametrize("mode", ["auto", "mask", "whole"])
@pytest.mark.parametrize("case_name", ["example", "wide_case"])
def test_cli_edit_all_modes(request, tmp_path, mode, case_name):
    case = request.getfixturevalue(case_name)
    out = tmp_path / "out"
    extra = {"auto": ["--target-word", case["target_word"]], "mask": ["--mask", case["mask"]],
             "whole": ["--whole-image"]}[mode]
    assert _cli("edit", "--image", case["image"], "--prompt", case["prompt"], "--edit-prompt", case["edit_prompt"],
                *extra, "--out", out, *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    edited = Image.open(out / "edited.png")
    src = Image.open(case["image"])
    # the output has the template's size of the image's aspect ratio (0.06M budget of the tiny preset)
    assert abs(edited.height / edited.width - src.height / src.width) < 0.1
    expected = {"edited.png", "reconstruction.png", "source.png", "report.html", "summary.json"}
    expected |= {"mask.png", "weights.png"} if mode != "whole" else set()
    expected |= {"attention.png"} if mode == "auto" else set()
    assert expected <= {p.name for p in out.iterdir()}
    assert summary["spec"]["mode"] == mode
    assert set(summary["seconds"]) >= {"prepare", "tune_prompt", "train_lora", "generate"}
    html = (out / "report.html").read_text()
    assert case["edit_prompt"] in html and "data:image/png;base64" in html
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_stage_commands_resume_to_the_same_edit(tmp_path, example):
    """The per-stage commands, run one after another, give the same edit as `edit` in one process."""
    common = ["--preset", "tiny", "-q"]
    case = tmp_path / "case"
    assert _cli("prepare", "--image", example["image"], "--prompt", example["prompt"], "--edit-prompt",
                example["edit_prompt"], "--target-word", example["target_word"], "--out", case,
                "--preset", "tiny") == 0
    assert _cli("-q", "tune-prompt", "--case-dir", case, "--out", tmp_path / "prompt", "--iters", "2") == 0
    assert _cli("-q", "train-lora", "--case-dir", case, "--prompt-dir", tmp_path / "prompt", "--out",
                tmp_path / "lora", "--iters", "2") == 0
    assert _cli("attention", "--case-dir", case, "--out", tmp_path / "attention") == 0
    assert _cli("mask", "--case-dir", case, "--attention-dir", tmp_path / "attention", "--out", tmp_path / "mask") == 0
    assert _cli("generate", "--case-dir", case, "--prompt-dir", tmp_path / "prompt", "--lora-dir", tmp_path / "lora",
                "--mask-dir", tmp_path / "mask", "--out", tmp_path / "gen") == 0
    assert _cli("edit", "--image", example["image"], "--prompt", example["prompt"], "--edit-prompt",
                example["edit_prompt"], "--target-word", example["target_word"], "--out", tmp_path / "one",
                "--prompt-iters", "2", "--lora-iters", "2", "--seed", "0", *common) == 0
    a = np.asarray(Image.open(tmp_path / "gen" / "edited.png"))
    b = np.asarray(Image.open(tmp_path / "one" / "edited.png"))
    assert np.array_equal(a, b)

    # the mask stage's hysteresis: recorded, and it only ever removes cells
    assert _cli("mask", "--case-dir", case, "--attention-dir", tmp_path / "attention", "--out", tmp_path / "core",
                "--core-threshold", "0.9") == 0
    assert json.loads((tmp_path / "core" / "stage.json").read_text())["settings"]["core"] == 0.9
    plain = load_file(str(tmp_path / "mask" / "weights.safetensors"))["edit_mask"].bool()
    cored = load_file(str(tmp_path / "core" / "weights.safetensors"))["edit_mask"].bool()
    assert cored.any() and not (cored & ~plain).any()
    assert _cli("mask", "--case-dir", case, "--attention-dir", tmp_path / "attention", "--out", tmp_path / "bad",
                "--core-threshold", "2") == 2
    assert not (tmp_path / "bad").exists()
    # the cleanup: recorded; filling holes never removes a cell; a bad size is refused with no output
    assert _cli("mask", "--case-dir", case, "--attention-dir", tmp_path / "attention", "--out", tmp_path / "filled",
                "--fill-holes") == 0
    assert json.loads((tmp_path / "filled" / "stage.json").read_text())["settings"]["fill_holes"] is True
    filled = load_file(str(tmp_path / "filled" / "weights.safetensors"))["edit_mask"].bool()
    assert not (plain & ~filled).any()
    assert _cli("mask", "--case-dir", case, "--attention-dir", tmp_path / "attention", "--out", tmp_path / "bad",
                "--min-region", "1.5") == 2
    assert not (tmp_path / "bad").exists()


def test_stage_seconds_cover_the_stage_work(tmp_path, models, example):
    """stage.json's ``seconds`` time the stage's work (not only its file writes): the KFP metrics read them."""
    from editinfinity.edit import stages

    case = stages.prepare(tmp_path / "case", image=example["image"], prompt=example["prompt"],
                          edit_prompt=example["edit_prompt"], mode="whole", models=models)
    t0 = time.perf_counter()
    stages.tune_prompt(case, tmp_path / "prompt", iters=3, models=models, progress=False)
    wall = time.perf_counter() - t0
    seconds = json.loads((tmp_path / "prompt" / "stage.json").read_text())["seconds"]
    assert 0.5 * wall <= seconds <= wall


def test_keep_weight_one_reproduces_the_source_codes(models, example):
    """Where W = 1 at every scale the edited codes equal the source codes; W = 1 everywhere decodes to the
    reconstruction (and the output, with kept pixels, is the source: tests/test_kept_pixels.py)."""
    spec = CaseSpec(image=example["image"], prompt=example["prompt"], edit_prompt=example["edit_prompt"],
                    mode="auto", target_word=example["target_word"], resolution="0.06M")
    case = prepare_case(models, spec)
    grid = case.grid
    settings = EditSettings(seed=3)
    ones = torch.ones(grid)
    res = generate_edit(models, case, None, None, ones, settings)
    assert np.array_equal(np.asarray(res.decoded), np.asarray(res.reconstruction))
    partial = torch.zeros(grid)
    partial[: grid[0] // 2] = 1.0
    res = generate_edit(models, case, None, None, partial, settings)
    source = models.vae  # noqa: F841  (decoded pictures mix across cells; compare codes instead)
    from editinfinity.models.quantizer import scale_codes_on_grid

    src = sum(scale_codes_on_grid(case.bits, case.schedule))
    keep = partial.bool()
    assert torch.equal(res.edited_codes[0][:, keep], src[0][:, keep])
    assert not torch.equal(res.edited_codes[0][:, ~keep], src[0][:, ~keep])


def test_lora_training_does_not_depend_on_the_global_rng(models, example):
    """LoRA dropout (peft, global RNG) is seeded from the settings: the same adapter whatever ran before."""
    from editinfinity.edit.lora import train_lora_adapter

    spec = CaseSpec(image=example["image"], prompt=example["prompt"], edit_prompt=example["edit_prompt"],
                    mode="whole", resolution="0.06M")
    case = prepare_case(models, spec)
    rows = torch.zeros(4, case.text["source_styled"].features.shape[-1])
    settings = EditSettings(lora_iters=2, style_rows=4, lora_dropout=0.5, seed=2)
    states = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        states.append(train_lora_adapter(models, case, rows, settings, progress=False)[0])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train_lora_adapter(models, case, rows, settings, progress=False)
    assert torch.equal(torch.rand(3), expected)  # and the caller's global RNG is left where it was


def test_whole_image_mode_equals_plain_generation(models, example):
    spec = CaseSpec(image=example["image"], prompt=example["prompt"], edit_prompt=example["edit_prompt"],
                    mode="whole", resolution="0.06M")
    case = prepare_case(models, spec)
    settings = EditSettings(seed=5)
    res = generate_edit(models, case, None, None, None, settings)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = models.transformer.generate(case.text["edit_styled"], case.schedule, cfg=settings.cfg, tau=settings.tau,
                                          top_k=settings.top_k, top_p=settings.top_p, generator=gen)
    assert torch.equal(res.edited_codes, out.summed_codes)


def test_pipeline_api(models, example):
    from editinfinity.pipeline import EditInfinityPipeline

    pipe = EditInfinityPipeline.from_bundle(models)
    out = pipe.edit(example["image"], example["prompt"], example["edit_prompt"], target_word=example["target_word"],
                    prompt_iters=1, lora_iters=1, progress=False)
    assert out.image.size == out.reconstruction.size
    assert out.attention.shape == out.weights.shape == out.case.grid
    assert len(out.losses["lora"]) == 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input through the console script: message, exit code, no traceback, no output


def _run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "editinfinity.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _assert_clean_failure(proc, out: Path, *needles: str):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_bad_inputs_fail_cleanly(tmp_path, example):
    out = tmp_path / "out"
    base = ["edit", "--prompt", example["prompt"], "--edit-prompt", example["edit_prompt"], "--out", out, *FAST]
    cases = [
        (["--image", tmp_path / "missing.png", "--target-word", "circle"], ["missing.png"]),
        (["--image", example["image"], "--target-word", "hexagon"], ["hexagon", "circle"]),
        (["--image", example["image"], "--target-word", "circle", "--preset", "nope"], ["nope", "tiny"]),
        (["--image", example["image"], "--target-word", "circle", "--weights", tmp_path / "noweights"],
         ["noweights"]),
    ]
    for extra, needles in cases:
        args = base[:-1] + ["-q"] if "--preset" not in extra else [a for a in base if a not in ("--preset", "tiny")]
        proc = _run_cli(*args, *extra)
        _assert_clean_failure(proc, out, *needles)


def test_existing_output_needs_overwrite(tmp_path, example):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _run_cli("edit", "--image", example["image"], "--prompt", example["prompt"], "--edit-prompt",
                    example["edit_prompt"], "--target-word", "circle", "--out", out, *FAST)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_stage_directory_from_another_case_is_refused(tmp_path, example, wide_case):
    for name, case in (("a", example), ("b", wide_case)):
        assert _cli("prepare", "--image", case["image"], "--prompt", case["prompt"], "--edit-prompt",
                    case["edit_prompt"], "--target-word", case["target_word"], "--out", tmp_path / name,
                    "--preset", "tiny") == 0
    assert _cli("-q", "tune-prompt", "--case-dir", tmp_path / "a", "--out", tmp_path / "pa", "--iters", "1") == 0
    proc = _run_cli("-q", "train-lora", "--case-dir", tmp_path / "b", "--prompt-dir", tmp_path / "pa", "--out",
                    tmp_path / "lb", "--iters", "1")
    _assert_clean_failure(proc, tmp_path / "lb", "another case")
    proc = _run_cli("attention", "--case-dir", tmp_path / "pa", "--out", tmp_path / "att")
    _assert_clean_failure(proc, tmp_path / "att", "prepare")
