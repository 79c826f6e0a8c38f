"""PIE-Bench runs: the toy-world set end to end through the CLI with the default preset (real models), and the
runner's bookkeeping with a fast stand-in for run_edit: modes and their inputs, resumption after an interrupted
run, failed cases and malformed entries that never stop the others, configuration checks, the outputs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editinfinity.edit.settings import EditSettings
from editinfinity.errors import InvalidCaseError
from editinfinity.evaluation.piebench_metrics import MetricModels
from editinfinity.evaluation.piebench_run import EDITED_FILE, run_piebench
from editinfinity.evaluation.toy import build_toy_piebench
from editinfinity.models.presets import default_preset_name


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """One case of each toy edit type (0, 1, 2, 3, 6, 8)."""
    return build_toy_piebench(tmp_path_factory.mktemp("toy") / "pie", per_type=1)


@pytest.fixture
def bench_main(monkeypatch):
    """The `editinfinity` entry point with `bench` registered (the lead wires add_eval_parser into cli.py)."""
    import editinfinity.cli as cli
    from editinfinity.evaluation.cli import add_eval_parser

    original = cli._add_extra_commands

    def extra(sub):
        original(sub)
        if "bench" not in sub.choices:
            add_eval_parser(sub)

    monkeypatch.setattr(cli, "_add_extra_commands", extra)
    return lambda *args: cli.main([str(a) for a in args])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ real models


def test_cli_end_to_end_with_the_default_preset(toy, tmp_path, bench_main, capsys):
    out = tmp_path / "out"
    # Type 6 has a target word (auto mask); type 2 (add object) has none and falls back to the whole image.
    args = ["-q", "bench", "piebench", "--data", toy, "--mode", "auto", "--out", out, "--types", "2,6",
            "--prompt-iters", "1", "--lora-iters", "1", "--seed", "3"]
    assert bench_main(*args) == 0
    printed = capsys.readouterr().out
    assert "2 cases scored (2 edited now, 0 already done)" in printed and "not computed" in printed
    rows = read_csv(out / "results.csv")
    assert [(r["id"], r["status"], r["mode"]) for r in rows] == [("200000000000", "ok", "whole"),
                                                                  ("600000000000", "ok", "auto")]
    assert rows[1]["target_word"] and "no target word" in rows[0]["note"]
    for r in rows:
        assert float(r["psnr"]) > 0 and 0 < float(r["mse"]) < 1 and -1 <= float(r["ssim"]) <= 1
        assert r["clip_whole"] == r["structure_distance"] == r["lpips"] == "not computed"
        case = out / "cases" / r["id"]
        assert Image.open(case / EDITED_FILE).size == (512, 512)
        assert (case / "edit" / "edited.png").is_file() and (case / "edit" / "report.html").is_file()
        record = json.loads((case / "case.json").read_text())
        assert record["config"]["preset"] == default_preset_name()
        assert record["config"]["settings"]["lora_iters"] == 1 and record["seconds"] > 0
    table = (out / "table.md").read_text()
    assert f"preset `{default_preset_name()}`" in table and "LoRA 1 updates" in table and "seed 3" in table
    assert "| 2 add object | 1 (1) | n/c |" in table and "| **All** | 2 (2) | n/c |" in table
    assert "<th colspan=\"4\">Background preservation</th>" in (out / "table.html").read_text()
    assert {p.name for p in (out / "grids").iterdir()} == {"type_2.png", "type_6.png"}
    before = (out / "cases" / "600000000000" / EDITED_FILE).read_bytes()
    # Same command again: everything is resumed, nothing edited, same files.
    assert bench_main(*args) == 0
    assert "2 cases scored (0 edited now, 2 already done)" in capsys.readouterr().out
    assert (out / "cases" / "600000000000" / EDITED_FILE).read_bytes() == before
    # Other settings in the same folder are refused (they would mix two configurations in one table).
    assert bench_main(*[a if a != "--seed" else "--threshold" for a in args[:-1]], "0.7") == 2
    assert "other settings" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ stand-in edits


class FakeEdit:
    """run_edit's contract in miniature: writes OUT atomically with edited.png (256x256, the model's size) and
    summary.json; records each call; can fail or be interrupted on chosen cases."""

    def __init__(self, fail: set[str] = frozenset(), interrupt_at: int | None = None):
        self.calls: list[dict] = []
        self.fail, self.interrupt_at = set(fail), interrupt_at

    def __call__(self, out_dir, *, image, prompt, edit_prompt, mode, target_word, mask, mask_polarity, resolution,
                 preset, weights, models, settings, overwrite, progress):
        case_id = Path(image).stem
        mask_pixels = np.asarray(Image.open(mask)) > 127 if mask else None
        self.calls.append({"id": case_id, "mode": mode, "target_word": target_word, "mask": mask_pixels,
                           "prompt": prompt, "edit_prompt": edit_prompt, "preset": preset, "models": models})
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if case_id in self.fail:
            raise InvalidCaseError(f"target word {target_word!r} not found")
        src = np.asarray(Image.open(image).convert("RGB").resize((256, 256)))
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True)
        Image.fromarray(255 - src).save(tmp / "edited.png")
        (tmp / "summary.json").write_text(json.dumps({"seconds": {"total": 0.5}}))
        tmp.rename(out)
        return out


def run(toy, out, fake, **kw):
    kw.setdefault("settings", EditSettings(prompt_iters=1, lora_iters=1))
    return run_piebench(str(toy), out, edit_fn=fake, models="stub-models", progress=False, **kw)


def test_modes_get_the_right_inputs(toy, tmp_path):
    fake = FakeEdit()
    result = run(toy, tmp_path / "auto", fake, mode="auto", types="2,3,6")
    assert result.ok == 3 and result.edited == 3 and result.failed == 0
    calls = {c["id"]: c for c in fake.calls}
    assert calls["200000000000"]["mode"] == "whole" and calls["200000000000"]["target_word"] is None
    assert calls["600000000000"]["mode"] == "auto" and calls["600000000000"]["target_word"]
    assert calls["300000000000"]["target_word"].startswith("and a ")  # the bracketed object of a deletion
    assert all(c["mask"] is None and c["models"] == "stub-models" for c in fake.calls)
    assert all("[" not in c["prompt"] + c["edit_prompt"] for c in fake.calls)

    fake = FakeEdit()
    run(toy, tmp_path / "mask", fake, mode="mask", types="1,2,8")
    from editinfinity.evaluation.piebench import read_piebench

    cases = read_piebench(str(toy)).by_id()
    for call in fake.calls:
        assert call["mode"] == "mask" and call["target_word"] is None
        # The annotation as drawn (no 1-px frame), white = edit.
        assert (call["mask"] == cases[call["id"]].annotation_mask(border=False)).all()

    fake = FakeEdit()
    run(toy, tmp_path / "whole", fake, mode="whole", types="8")
    assert [(c["id"], c["mode"], c["mask"]) for c in fake.calls] == [("800000000000", "whole", None)]


def test_scores_follow_the_protocol(toy, tmp_path):
    """The fake edit is the colour-inverted source: check one row against the metric functions directly."""
    from editinfinity.evaluation.piebench import read_piebench
    from editinfinity.evaluation.piebench_metrics import score_case

    out = tmp_path / "out"
    result = run(toy, out, FakeEdit(), mode="auto", types="1")
    (row,) = result.rows
    case = read_piebench(str(toy)).by_id()["100000000000"]
    edited = Image.open(out / "cases" / row.id / EDITED_FILE)
    expect = score_case(Image.open(case.image), edited, case.annotation_mask(), case.edit_prompt)
    assert row.scores == pytest.approx(expect, nan_ok=True)
    cached = json.loads((out / "cases" / row.id / "scores.json").read_text())
    assert cached["models"] == MetricModels().describe() and cached["scores"]["psnr"] == pytest.approx(row.scores["psnr"])
    csv_row = read_csv(out / "results.csv")[0]
    assert float(csv_row["psnr"]) == pytest.approx(row.scores["psnr"]) and csv_row["lpips"] == "not computed"
    table = (out / "table.md").read_text()
    assert f"| 1 change object | 1 (1) | n/c | {row.scores['psnr']:.2f} | n/c | {row.scores['mse'] * 1e4:.2f} |" in table


def test_resumes_after_an_interrupted_run(toy, tmp_path):
    out = tmp_path / "out"
    fake = FakeEdit(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run(toy, out, fake, mode="auto", types="0,1,2,3")
    done = sorted(p.parent.name for p in (out / "cases").glob(f"*/{EDITED_FILE}"))
    assert done == ["000000000000", "100000000000"]
    third = out / "cases" / "200000000000"
    assert not (third / EDITED_FILE).exists() and not (third / "case.json").exists()
    assert not list(out.rglob("*.tmp*")) and not list(out.rglob(".mask-*"))
    before = (out / "cases" / "000000000000" / EDITED_FILE).stat().st_mtime_ns

    fake = FakeEdit()
    result = run(toy, out, fake, mode="auto", types="0,1,2,3")
    assert [c["id"] for c in fake.calls] == ["200000000000", "300000000000"]
    assert result.resumed == 2 and result.edited == 2 and result.ok == 4
    assert (out / "cases" / "000000000000" / EDITED_FILE).stat().st_mtime_ns == before
    # A finished edit folder whose 512x512 copy was lost is reused, not re-edited.
    (out / "cases" / "300000000000" / EDITED_FILE).unlink()
    fake = FakeEdit()
    result = run(toy, out, fake, mode="auto", types="0,1,2,3")
    assert fake.calls == [] and result.edited == 1 and result.ok == 4


def test_a_failing_case_never_stops_the_others_and_is_retried(toy, tmp_path):
    out = tmp_path / "out"
    fake = FakeEdit(fail={"100000000000"})
    result = run(toy, out, fake, mode="auto", types="0,1,2")
    assert len(fake.calls) == 3 and result.ok == 2 and result.failed == 1
    rows = {r["id"]: r for r in read_csv(out / "results.csv")}
    assert rows["100000000000"]["status"] == "failed" and "not found" in rows["100000000000"]["error"]
    assert rows["100000000000"]["psnr"] == "" and rows["000000000000"]["status"] == "ok"
    assert json.loads((out / "cases" / "100000000000" / "error.json").read_text())["type"] == "InvalidCaseError"
    assert "| **All** | 3 (2) |" in (out / "table.md").read_text()
    # The next run retries only the failed case; once it succeeds its error record is gone.
    fake = FakeEdit()
    result = run(toy, out, fake, mode="auto", types="0,1,2")
    assert [c["id"] for c in fake.calls] == ["100000000000"] and result.ok == 3
    assert not (out / "cases" / "100000000000" / "error.json").exists()


def test_malformed_entries_are_reported_and_the_rest_runs(toy, tmp_path):
    data = tmp_path / "pie"
    import shutil

    shutil.copytree(toy, data)
    mapping = json.loads((data / "mapping_file.json").read_text())
    good = {k: mapping[k] for k in ("000000000000", "100000000000")}
    bad = {"999000000000": {**good["100000000000"], "mask": [5, 1, 2]},
           "999000000001": {**good["100000000000"], "editing_type_id": "12"}}
    (data / "mapping_file.json").write_text(json.dumps({**good, **bad}))
    fake = FakeEdit()
    result = run_piebench(str(data), tmp_path / "out", mode="whole", edit_fn=fake, models="m", progress=False)
    assert result.ok == 2 and result.invalid_entries == 2 and len(fake.calls) == 2
    rows = {r["id"]: r for r in read_csv(tmp_path / "out" / "results.csv")}
    assert rows["999000000000"]["status"] == "invalid entry" and "odd number" in rows["999000000000"]["error"]
    assert "editing_type_id" in rows["999000000001"]["error"]
    assert "2 malformed" in (tmp_path / "out" / "table.md").read_text()


def test_configuration_is_checked_on_resume(toy, tmp_path):
    out = tmp_path / "out"
    run(toy, out, FakeEdit(), mode="whole", types="0")
    with pytest.raises(InvalidCaseError, match=r"mode \('whole' -> 'auto'\)"):
        run(toy, out, FakeEdit(), mode="auto", types="0")
    with pytest.raises(InvalidCaseError, match="settings.lora_iters"):
        run(toy, out, FakeEdit(), mode="whole", types="0", settings=EditSettings(prompt_iters=1, lora_iters=2))
    # More cases with the same settings is a resume, not a conflict.
    fake = FakeEdit()
    assert run(toy, out, fake, mode="whole", types="0,1").ok == 2 and len(fake.calls) == 1
    with pytest.raises(InvalidCaseError, match="--mode"):
        run(toy, out, FakeEdit(), mode="blend")
    # A setting added by a later version (absent from the old record) or a speed-only one is no conflict.
    record = json.loads((out / "bench.json").read_text())
    del record["config"]["settings"]["top_k"]
    record["config"]["settings"]["low_memory"] = "something else"
    (out / "bench.json").write_text(json.dumps(record))
    assert run(toy, out, FakeEdit(), mode="whole", types="0").ok == 1


def test_score_only_edits_nothing(toy, tmp_path):
    out = tmp_path / "out"
    run(toy, out, FakeEdit(), mode="whole", types="0,1", limit=1)
    fake = FakeEdit()
    result = run(toy, out, fake, mode="whole", types="0,1", edit=False)
    assert fake.calls == [] and result.ok == 1
    assert [r.status for r in result.rows] == ["ok", "not run"]
    assert "| **All** | 2 (1) |" in (out / "table.md").read_text()


class FakeEditWithStages(FakeEdit):
    """Also writes what the generate and mask stages leave for the two output variants: the decode (the inverted
    source), the source, the keep weights (left half kept) and a generate record without kept pixels."""

    def __call__(self, out_dir, **kw):
        out = super().__call__(out_dir, **kw)
        from safetensors.torch import save_file

        src = Image.open(kw["image"]).convert("RGB").resize((256, 256))
        (out / "stages" / "generate").mkdir(parents=True)
        (out / "stages" / "mask").mkdir(parents=True)
        Image.open(out / "edited.png").save(out / "stages" / "generate" / "decoded.png")
        src.save(out / "stages" / "generate" / "source.png")
        (out / "stages" / "generate" / "stage.json").write_text(json.dumps({"keep_pixels": False}))
        weights = torch.zeros(16, 16)
        weights[:, :8] = 1.0
        save_file({"weights": weights, "edit_mask": (weights < 1).to(torch.uint8)},
                  str(out / "stages" / "mask" / "weights.safetensors"))
        return out


def test_both_outputs_are_scored_as_published_and_with_kept_pixels(toy, tmp_path):
    from editinfinity.edit.pixels import keep_source_pixels
    from editinfinity.evaluation.piebench import read_piebench
    from editinfinity.evaluation.piebench_metrics import score_case
    from editinfinity.evaluation.piebench_run import VARIANT_FILES, VARIANT_LABELS, to_eval_size

    out = tmp_path / "out"
    result = run(toy, out, FakeEditWithStages(), mode="auto", types="1",
                 settings=EditSettings(prompt_iters=1, lora_iters=1, keep_pixels=False))
    (row,) = result.rows
    case = read_piebench(str(toy)).by_id()[row.id]
    case_dir = out / "cases" / row.id
    edit_dir = case_dir / "edit"
    decoded = Image.open(edit_dir / "stages" / "generate" / "decoded.png")
    kept = keep_source_pixels(Image.open(edit_dir / "stages" / "generate" / "source.png"), decoded,
                              torch.cat([torch.ones(16, 8), torch.zeros(16, 8)], dim=1))
    assert np.array_equal(np.asarray(Image.open(case_dir / VARIANT_FILES["published"])),
                          np.asarray(to_eval_size(decoded)))
    assert np.array_equal(np.asarray(Image.open(case_dir / VARIANT_FILES["kept"])), np.asarray(to_eval_size(kept)))
    source = Image.open(case.image)
    for name in ("published", "kept"):
        expect = score_case(source, Image.open(case_dir / VARIANT_FILES[name]), case.annotation_mask(),
                            case.edit_prompt)
        assert row.variant_scores[name] == pytest.approx(expect, nan_ok=True)
    assert row.variant_scores["kept"]["psnr"] > row.variant_scores["published"]["psnr"]
    table = (out / "table.md").read_text()
    for name, label in VARIANT_LABELS.items():
        assert f"| {label} | 1 (1) | n/c | {row.variant_scores[name]['psnr']:.2f} |" in table
