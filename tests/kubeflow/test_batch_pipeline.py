"""The batch pipeline under ``kfp.local`` with the real stages (tiny preset, CPU): invalid and failing cases among
valid ones, the run still succeeds and its summary page lists every outcome; a bad cases file fails in the plan step.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from editinfinity.demo import example_dir
from pipelines import cli as kfp_cli
from pipelines.cli import PipelineRunError


@pytest.fixture
def cases_file(tmp_path):
    ex = example_dir()
    case = json.loads((ex / "case.json").read_text())
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ex / case["image"], data / "a.png")
    shutil.copy(ex / "mask.png", data / "mask.png")
    Image.new("L", (64, 64), 0).save(data / "black.png")
    p, e = case["prompt"], case["edit_prompt"]
    rows = [
        {"id": "green", "image": "a.png", "prompt": p, "edit_prompt": e, "target_word": "circle"},
        {"id": "masked", "image": "a.png", "prompt": p, "edit_prompt": e, "mask": "mask.png"},
        {"id": "no-word", "image": "a.png", "prompt": p, "edit_prompt": e, "target_word": "hexagon"},
        {"id": "no-image", "image": "gone.png", "prompt": p, "edit_prompt": e, "mode": "whole"},
        {"id": "empty-mask", "image": "a.png", "prompt": p, "edit_prompt": e, "mask": "black.png"},
    ]
    path = data / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, case


def test_batch_with_bad_cases_finishes_with_every_outcome(tmp_path, cases_file):
    path, case = cases_file
    out = tmp_path / "out"
    run = kfp_cli.run_local("batch", pipeline_root=tmp_path / "root", cases_uri=str(path), output_uri=str(out),
                            shards=2, preset="tiny", prompt_iters=2, lora_iters=2, seed=2)
    page = (out / "index.html").read_text()
    assert "2 done, 1 failed, 2 invalid" in page
    rows = {r["id"]: r for r in map(json.loads, (out / "summary.jsonl").read_text().splitlines())}
    assert {i: r["status"] for i, r in rows.items()} == {"green": "done", "masked": "done", "no-word": "invalid",
                                                        "no-image": "invalid", "empty-mask": "failed"}
    assert "hexagon" in rows["no-word"]["error"] and "marks no pixel" in rows["empty-mask"]["error"]
    assert 'href="green/report.html"' in page and (out / "green" / "report.html").is_file()
    metrics = json.loads((run.run_dir / "batch-summary" / "executor_output.json").read_text())
    figures = next(a for a in metrics["artifacts"]["metrics"]["artifacts"])["metadata"]
    assert figures["cases_done"] == 2 and figures["cases_failed"] == 1 and figures["cases_invalid"] == 2
    # the worker's edit is the one-shot edit of the case
    from editinfinity.cli import main

    one = tmp_path / "one"
    assert main(["-q", "edit", "--image", str(path.parent / "a.png"), "--prompt", case["prompt"], "--edit-prompt",
                 case["edit_prompt"], "--target-word", "circle", "--out", str(one), "--preset", "tiny",
                 "--prompt-iters", "2", "--lora-iters", "2", "--seed", "2"]) == 0
    assert np.array_equal(np.asarray(Image.open(one / "edited.png")), np.asarray(Image.open(out / "green" /
                                                                                            "edited.png")))


def test_bad_cases_file_fails_in_the_plan_step(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps({"image": "a.png", "prompt": "p"}) + "\n")
    with pytest.raises(PipelineRunError, match="batch-plan") as err:
        kfp_cli.run_local("batch", pipeline_root=tmp_path / "root", cases_uri=str(path),
                          output_uri=str(tmp_path / "out"), preset="tiny")
    assert not re.search(r"\x1b\[", str(err.value))
