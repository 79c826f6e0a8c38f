"""The stage sequence (edit.sequence): which steps run in which mode, in which order, under which timing keys; and
run_edit's model loading timed only where the run loads the models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from editinfinity.edit.run import run_edit
from editinfinity.edit.sequence import StageTimer, Steps, run_stages
from editinfinity.edit.settings import EditSettings
from editinfinity.models.bundle import load_models


def _recording_steps(calls: list, learned: bool = False) -> Steps:
    def step(name, result):
        def fn(*args):
            calls.append((name, args))
            return result
        return fn

    prepare = step("prepare", ("case", "rows", "adapter") if learned else "case")
    return Steps(prepare=prepare, tune_prompt=step("tune_prompt", "rows"), train_lora=step("train_lora", "adapter"),
                 attention=step("attention", "amap"), mask=step("mask", "weights"),
                 generate=step("generate", "edited"), learned=learned)


@pytest.mark.parametrize("mode, ran", [
    ("auto", ["prepare", "tune_prompt", "train_lora", "attention", "mask", "generate"]),
    ("mask", ["prepare", "tune_prompt", "train_lora", "mask", "generate"]),
    ("whole", ["prepare", "tune_prompt", "train_lora", "generate"]),
])
def test_steps_of_each_mode_in_order_with_their_inputs(mode, ran):
    calls = []
    timer = StageTimer()
    out = run_stages(_recording_steps(calls), mode=mode, timer=timer)
    assert [name for name, _ in calls] == ran
    args = dict(calls)
    assert args["tune_prompt"] == ("case",) and args["train_lora"] == ("case", "rows")
    assert args["generate"] == ("case", "rows", "adapter", "weights" if mode != "whole" else None)
    if mode != "whole":
        assert args["mask"] == ("case", "amap" if mode == "auto" else None)
    assert list(timer.seconds) == ran
    assert (out.case, out.prompt, out.lora, out.generate) == ("case", "rows", "adapter", "edited")
    record = timer.record()
    assert record["total"] == pytest.approx(sum(timer.seconds.values()), abs=1e-3)
    assert "peak_gpu_memory_gb" not in record  # no CUDA models


def test_learned_state_skips_training_and_learning_stops_after_lora():
    calls = []
    run_stages(_recording_steps(calls, learned=True), mode="auto", timer=StageTimer())
    assert [name for name, _ in calls] == ["prepare", "attention", "mask", "generate"]
    calls.clear()
    out = run_stages(_recording_steps(calls), mode="auto", timer=StageTimer(), last="train_lora")
    assert [name for name, _ in calls] == ["prepare", "tune_prompt", "train_lora"] and out.generate is None
    with pytest.raises(ValueError, match="last must be one of"):
        run_stages(_recording_steps(calls), mode="auto", timer=StageTimer(), last="load_models")


def test_timer_keys_and_total():
    timer = StageTimer()
    assert timer("load_models", lambda: None) is None
    timer("prepare", lambda: 1)
    with pytest.raises(ValueError, match="unknown stage 'tune-prompt'"):
        timer("tune-prompt", lambda: 1)
    record = timer.record()
    assert set(record) == {"load_models", "prepare", "total"}
    assert record["total"] == record["prepare"]  # model loading is not part of the edit's total


@pytest.fixture(scope="module")
def tiny():
    return load_models("tiny", device="cpu")


def test_run_edit_times_model_loading_only_when_it_loads(tmp_path, example, tiny):
    settings = EditSettings(prompt_iters=1, lora_iters=1)
    case = {"image": example["image"], "prompt": example["prompt"], "edit_prompt": example["edit_prompt"],
            "mode": "whole", "settings": settings, "progress": False}
    loaded = []

    def loader():
        loaded.append(True)
        return tiny

    given = json.loads((run_edit(tmp_path / "given", models=tiny, **case) / "summary.json").read_text())["seconds"]
    timed = json.loads((run_edit(tmp_path / "loaded", models_loader=loader, **case) / "summary.json").read_text())
    assert loaded == [True]
    assert "load_models" not in given  # loaded by the caller before the run: not timed as if it took no time
    assert timed["seconds"]["load_models"] >= 0 and set(timed["seconds"]) - {"load_models"} == set(given)
    assert set(given) == {"prepare", "tune_prompt", "train_lora", "generate", "total"}


def _snapshot(case, settings) -> dict:
    """Every value of the case and the settings, copied (tensors cloned)."""
    return {"settings": settings.to_dict(), "spec": case.spec.to_dict(), "image": case.image.tobytes(),
            "raw": case.raw_features.clone(), "bits": [b.clone() for b in case.bits],
            "text": {k: (t.features.clone(), list(t.lens)) for k, t in case.text.items()},
            "target_range": case.target_range, "run_id": case.run_id}


def _same(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(i, j) for i, j in zip(x, y, strict=True))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return x == y

    return eq(a, b)


def test_stage_functions_leave_their_arguments_as_they_were(tmp_path, example, tiny):
    """The in-memory stages never change the case or the settings they are given; the stages over folders take
    iterations and seed as arguments and leave the caller's settings as they were."""
    from editinfinity.edit.attention import attention_map
    from editinfinity.edit.case import CaseSpec
    from editinfinity.edit.generate import generate, generate_edit
    from editinfinity.edit.lora import train_lora, train_lora_adapter
    from editinfinity.edit.masking import edit_weights
    from editinfinity.edit.prepare import prepare, prepare_case
    from editinfinity.edit.prompt_tuning import tune_prompt, tune_prompt_embedding

    settings = EditSettings(prompt_iters=1, lora_iters=1, seed=2)
    spec = CaseSpec(image=example["image"], prompt=example["prompt"], edit_prompt=example["edit_prompt"],
                    mode="auto", target_word=example["target_word"], resolution="0.06M")
    case = prepare_case(tiny, spec, settings)
    before = _snapshot(case, settings)
    rows, _ = tune_prompt_embedding(tiny, case, settings, False)
    adapter, _ = train_lora_adapter(tiny, case, rows, settings, False)
    amap = attention_map(tiny, case)
    _, weights = edit_weights(case, amap, settings.threshold, settings.band, settings.core)
    generate_edit(tiny, case, rows, adapter, weights, settings)
    assert _same(before, _snapshot(case, settings))

    caller = EditSettings(prompt_iters=3, lora_iters=3, seed=0)
    kept = caller.to_dict()
    case_dir = prepare(tmp_path / "case", image=example["image"], prompt=example["prompt"],
                       edit_prompt=example["edit_prompt"], mode="whole", models=tiny, settings=caller)
    prompt_dir = tune_prompt(case_dir, tmp_path / "prompt", iters=1, seed=5, models=tiny, settings=caller,
                             progress=False)
    lora_dir = train_lora(case_dir, prompt_dir, tmp_path / "lora", iters=1, seed=5, models=tiny, settings=caller,
                          progress=False)
    generate(case_dir, prompt_dir, lora_dir, tmp_path / "gen", seed=5, models=tiny, settings=caller)
    assert caller.to_dict() == kept


@pytest.mark.parametrize("mode", ["auto", "mask"])
def test_python_pipeline_and_run_edit_give_one_edit_under_one_set_of_keys(tmp_path, example, tiny, mode):
    from editinfinity.pipeline import EditInfinityPipeline

    settings = EditSettings(prompt_iters=1, lora_iters=2, seed=4)
    where = {"auto": {"target_word": example["target_word"]}, "mask": {"mask": example["mask"]}}[mode]
    out = EditInfinityPipeline.from_bundle(tiny).edit(example["image"], example["prompt"], example["edit_prompt"],
                                                      settings=settings, progress=False, **where)
    run = run_edit(tmp_path / "cli", image=example["image"], prompt=example["prompt"],
                   edit_prompt=example["edit_prompt"], mode=mode, models=tiny, settings=settings, progress=False,
                   **where)
    summary = json.loads((run / "summary.json").read_text())
    assert set(out.seconds) == set(summary["seconds"])
    assert np.array_equal(np.asarray(out.image), np.asarray(Image.open(run / "edited.png")))
