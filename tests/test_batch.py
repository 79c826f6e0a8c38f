"""Batch = plan, work, summary (tiny preset, CPU): invalid cases reported without running, a failing case among
valid ones, one learn per image, resume, the same pixels as one-shot edits, several worker processes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from editinfinity.batch.outcomes import browser_link, summarize_batch
from editinfinity.batch.plan import EDIT_COST, LEARN_COST, make_plan, read_plan, split, write_plan
from editinfinity.batch.worker import Worker, run_processes, status_uri
from editinfinity.cli import main
from editinfinity.demo import example_dir
from editinfinity.edit.settings import EditSettings
from editinfinity.models.bundle import load_models
from editinfinity.toyworld import Scene, Shape, caption, render

SETTINGS = EditSettings(prompt_iters=2, lora_iters=2, seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    ex = example_dir()
    case = json.loads((ex / "case.json").read_text())
    shutil.copy(ex / case["image"], d / "a.png")
    shutil.copy(ex / "mask.png", d / "mask.png")
    Image.new("L", (64, 64), 0).save(d / "black.png")  # a readable mask that marks nothing: fails in the worker
    scene = Scene("white", (Shape("triangle", "purple", 90, 120, 100),), width=320, height=256)
    render(scene).save(d / "b.png")
    return {"dir": d, "prompt": case["prompt"], "edit_prompt": case["edit_prompt"], "b_prompt": caption(scene)}


def _cases(files) -> list[dict]:
    d, p = files["dir"], files["prompt"]
    rows = [
        ("a-green", "a.png", p, files["edit_prompt"], "auto", "circle", ""),
        ("a-yellow", "a.png", p, files["edit_prompt"].replace("green", "yellow"), "auto", "circle", ""),
        ("a-mask", "a.png", p, files["edit_prompt"], "mask", "", "mask.png"),
        ("b-whole", "b.png", files["b_prompt"], files["b_prompt"].replace("purple", "green"), "whole", "", ""),
        ("bad-word", "a.png", p, "a green hexagon", "auto", "hexagon", ""),
        ("bad-image", "missing.png", "a cat", "a dog", "whole", "", ""),
        ("bad-mask", "a.png", p, files["edit_prompt"], "mask", "", "nomask.png"),
        ("fails", "a.png", p, files["edit_prompt"], "mask", "", "black.png"),
    ]
    return [{"id": i, "image": str(d / img), "prompt": pr, "edit_prompt": e, "mode": m, "target_word": w,
             "mask": str(d / mask) if mask else "", "output_uri": ""} for i, img, pr, e, m, w, mask in rows]


@pytest.fixture(scope="module")
def models():
    return load_models("tiny", device="cpu")


def test_plan_reports_invalid_cases_and_groups_by_image(files, tmp_path):
    plan = make_plan(_cases(files), output_uri=str(tmp_path / "out"), shards=2, preset="tiny", settings=SETTINGS)
    assert sorted(c["id"] for c in plan.invalid) == ["bad-image", "bad-mask", "bad-word"]
    errors = {c["id"]: c["error"] for c in plan.invalid}
    assert "hexagon" in errors["bad-word"] and "missing.png" in errors["bad-image"]
    assert "nomask.png" in errors["bad-mask"]
    # one group per (image, prompt): a.png's four valid cases share one learn
    assert sorted(len(g["cases"]) for g in plan.groups) == [1, 4]
    assert sorted(i for s in plan.shards for i in s) == [0, 1] and len(plan.shards) == 2
    write_plan(plan, tmp_path / "plan.json")
    assert read_plan(tmp_path / "plan.json") == plan


def test_split_balances_cost_and_is_deterministic():
    groups = [{"cases": [None] * n} for n in (1, 30, 2, 2, 1, 1, 10)]
    bins = split(groups, 3)
    assert bins == split(groups, 3)
    assert sorted(i for b in bins for i in b) == list(range(7))
    cost = [LEARN_COST + EDIT_COST * len(g["cases"]) for g in groups]
    loads = [sum(cost[i] for i in b) for b in bins]
    assert max(loads) - min(loads) <= max(cost)  # greedy largest-first: within one group of each other
    assert split(groups, 1) == [list(range(7))]
    assert len(split(groups, 20)) == 7  # no empty shards
    with pytest.raises(Exception, match="shards"):
        split(groups, 0)


def test_plan_needs_an_output_uri(files):
    with pytest.raises(Exception, match="output_uri"):
        make_plan(_cases(files)[:1], output_uri="", preset="tiny")


def test_worker_same_pixels_as_one_shot_and_resume(files, tmp_path, models):
    from editinfinity.edit.run import run_edit

    out = tmp_path / "out"
    plan = make_plan(_cases(files), output_uri=str(out), shards=1, preset="tiny", settings=SETTINGS)
    worker = Worker(plan, models=models)
    statuses = {s["id"]: s for s in worker.run(plan.shard_groups(0))}
    assert {i: s["status"] for i, s in statuses.items()} == {
        "a-green": "done", "a-yellow": "done", "a-mask": "done", "b-whole": "done", "fails": "failed"}
    assert "marks no pixel" in statuses["fails"]["error"]
    done = [s["seconds"] for s in statuses.values() if s["status"] == "done"]
    assert all({"prepare", "generate", "total", "case"} <= set(sec) for sec in done)
    assert not any("load_models" in sec for sec in done)  # the models were loaded before the worker
    assert sum("learn" in sec for sec in done) == 2  # once per image (a, b), on the case that paid for it
    assert len({statuses[i]["learned"] for i in ("a-green", "a-yellow", "a-mask")}) == 1
    for case in plan.cases:
        if case["id"] == "fails":
            continue
        one = run_edit(tmp_path / f"one-{case['id']}", image=case["image"], prompt=case["prompt"],
                       edit_prompt=case["edit_prompt"], mode=case["mode"], target_word=case["target_word"] or None,
                       mask=case["mask"] or None, models=models, settings=EditSettings(**vars(SETTINGS)),
                       progress=False)
        a = np.asarray(Image.open(one / "edited.png"))
        b = np.asarray(Image.open(out / case["id"] / "edited.png"))
        assert np.array_equal(a, b), case["id"]
    # resume: a re-run publishes nothing again and retries only the failed case
    before = (out / "a-green" / "edited.png").stat().st_mtime_ns
    again = {s["id"]: s for s in Worker(plan, models=models).run(plan.shard_groups(0))}
    assert again["a-green"].get("resumed") and not again["fails"].get("resumed")
    assert (out / "a-green" / "edited.png").stat().st_mtime_ns == before
    summary = summarize_batch(plan)
    assert summary.counts == {"done": 4, "failed": 1, "invalid": 3, "not run": 0}
    assert summary.metrics["cases_done"] == 4 and summary.metrics["cases_failed"] == 1
    assert 'href="a-green/report.html"' in summary.html and "hexagon" in summary.html


def test_summary_reports_cases_no_worker_reached(files, tmp_path):
    plan = make_plan(_cases(files), output_uri=str(tmp_path / "out"), preset="tiny", settings=SETTINGS)
    summary = summarize_batch(plan)
    assert summary.counts == {"done": 0, "failed": 0, "invalid": 3, "not run": 5}


def test_links_open_in_a_browser():
    assert browser_link("gs://b/run/c1/report.html") == "https://storage.cloud.google.com/b/run/c1/report.html"
    assert browser_link("s3://b/run/c1/report.html").startswith("https://s3.console.aws.amazon.com/s3/object/b?")
    assert browser_link("/data/run/c1/report.html", "/data/run") == "c1/report.html"


def test_worker_processes_split_a_shard(files, tmp_path):
    """Two worker processes (both on the CPU here, as two on one GPU) share a shard: each case done once."""
    cases = [c for c in _cases(files) if c["id"] in ("a-green", "a-yellow", "b-whole")]
    plan = make_plan(cases, output_uri=str(tmp_path / "out"), preset="tiny", settings=SETTINGS)
    path = write_plan(plan, tmp_path / "plan.json")
    statuses = run_processes(path, 0, ["cpu", "cpu"], log_dir=tmp_path)
    assert sorted((s["id"], s["status"]) for s in statuses) == [("a-green", "done"), ("a-yellow", "done"),
                                                                ("b-whole", "done")]
    workers = {json.loads(open(status_uri(plan.output_uri, c["id"])).read())["worker"] for c in cases}
    assert workers == {"shard0.0", "shard0.1"}


def test_cli_batch_run_writes_the_summary_page(files, tmp_path):
    cases = tmp_path / "cases.jsonl"
    keep = ("a-green", "bad-word", "fails")
    cases.write_text("".join(json.dumps({k: v for k, v in c.items() if v and k != "output_uri"}) + "\n"
                             for c in _cases(files) if c["id"] in keep))
    out = tmp_path / "out"
    assert main(["-q", "batch", "run", "--cases", str(cases), "--output-uri", str(out), "--preset", "tiny",
                 "--prompt-iters", "2", "--lora-iters", "2", "--seed", "1"]) == 0
    page = (out / "index.html").read_text()
    assert "1 done, 1 failed, 1 invalid" in page
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert {r["id"]: r["status"] for r in rows} == {"a-green": "done", "bad-word": "invalid", "fails": "failed"}
    seconds = json.loads(open(status_uri(str(out), "a-green")).read())["seconds"]
    assert seconds["load_models"] > 0 and seconds["learn"] > 0  # the worker loaded the models and learned the image


def test_a_cases_run_settings_are_used_by_the_planner_and_the_worker(files, models, tmp_path):
    """seed / prompt_iters / lora_iters / threshold / preset on a line of the cases file, read as the CLI's --case
    reads them: they apply to that case; cases learn together only with equal learning settings; another preset
    than the batch's makes the case invalid."""
    from editinfinity.batch.cases import parse_cases
    from editinfinity.errors import InvalidCaseError

    d, p = files["dir"], files["prompt"]
    base = {"image": str(d / "a.png"), "prompt": p, "edit_prompt": files["edit_prompt"]}
    lines = [{"id": "plain", **base, "mode": "whole"},
             {"id": "same-seed", **base, "mode": "whole", "seed": SETTINGS.seed},
             {"id": "own-threshold", **base, "target_word": "circle", "threshold": 0.3},
             {"id": "more-lora", **base, "mode": "whole", "lora_iters": SETTINGS.lora_iters + 1},
             {"id": "other-model", **base, "mode": "whole", "preset": "toy"}]
    cases = parse_cases("\n".join(json.dumps(x) for x in lines), cases_uri=str(d / "cases.jsonl"))
    out = tmp_path / "out"
    plan = make_plan(cases, output_uri=str(out), preset="tiny", settings=SETTINGS)
    assert [c["id"] for c in plan.invalid] == ["other-model"]
    assert "differs from the batch's preset 'tiny'" in plan.invalid[0]["error"]
    groups = {tuple(c["id"] for c in g["cases"]): g.get("settings") for g in plan.groups}
    assert groups == {("plain", "same-seed", "own-threshold"): None,
                      ("more-lora",): {"lora_iters": SETTINGS.lora_iters + 1}}
    statuses = Worker(plan, models=models).run(plan.groups)
    assert {s["id"]: s["status"] for s in statuses} == dict.fromkeys(["plain", "same-seed", "own-threshold",
                                                                       "more-lora"], "done")
    ran = {i: json.loads((out / i / "summary.json").read_text())["settings"]
           for i in ("plain", "own-threshold", "more-lora")}
    # the summaries show the threshold used: the batch preset's when unset, the case's own when given
    assert ran["plain"]["threshold"] == SETTINGS.mask_threshold("tiny") and ran["own-threshold"]["threshold"] == 0.3
    assert ran["plain"]["lora_iters"] == SETTINGS.lora_iters and ran["more-lora"]["lora_iters"] == SETTINGS.lora_iters + 1
    with pytest.raises(InvalidCaseError, match=r"line 1: `seed` 'x' is not valid; see --seed"):
        parse_cases(json.dumps({**base, "seed": "x"}), cases_uri="cases.jsonl")
