"""The automatic mask's threshold: the preset's when the settings leave it unset (``Preset.mask_threshold``), the
given one otherwise; what the mask stage, the edit's summary and report, and the benchmark records show is the
number used, never ``None``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from editinfinity.cli import main
from editinfinity.edit.case import CaseSpec
from editinfinity.edit.masking import edit_weights, make_mask
from editinfinity.edit.prepare import CaseData
from editinfinity.edit.settings import EditSettings
from editinfinity.errors import InvalidCaseError
from editinfinity.models import schedules
from editinfinity.models.presets import PRESETS, Preset, effective_mask_threshold, mask_threshold_for

TOY, TINY = mask_threshold_for("toy"), mask_threshold_for("tiny")
#: Between the two presets' cuts: cells at this level of the map's range are in toy's mask, not in tiny's.
LEVEL = (TOY + TINY) / 2


def test_presets_thresholds_and_the_fallback():
    assert TINY == Preset.mask_threshold == PRESETS["2b"].mask_threshold  # the method's, for the Infinity family
    assert TOY == PRESETS["toy"].mask_threshold < TINY  # the toy model's flat maps need a lower cut
    for name in ("", None, "pretrained", "/some/converted/dir"):  # no preset: the method's
        assert mask_threshold_for(name) == Preset.mask_threshold
    assert effective_mask_threshold(None, "toy") == TOY and effective_mask_threshold(0.45, "toy") == 0.45
    assert effective_mask_threshold(0.0, "toy") == 0.0  # a given 0 is a value, not "unset"


def test_settings_leave_the_threshold_unset_and_validate_only_a_given_one():
    settings = EditSettings.from_profile("default")
    assert settings.threshold is None and settings.mask_threshold("toy") == TOY
    assert settings.mask_threshold("tiny") == TINY
    assert settings.effective_dict("toy")["threshold"] == TOY and settings.to_dict()["threshold"] is None
    given = EditSettings.from_profile("default", threshold=0.45)
    assert given.mask_threshold("toy") == given.effective_dict("toy")["threshold"] == 0.45
    with pytest.raises(InvalidCaseError, match="--threshold"):
        EditSettings.from_profile("default", threshold=1.5)


def _map(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An attention map over ``grid``: 0 outside, a peak block at 1 and a ring around it at ``LEVEL`` (the
    object's edge cells of a flat map); returns (map, peak cells, ring cells)."""
    h, w = grid
    amap = torch.zeros(h, w)
    cy, cx = h // 2, w // 2
    amap[cy - 3:cy + 4, cx - 3:cx + 4] = LEVEL
    amap[cy - 1:cy + 2, cx - 1:cx + 2] = 1.0
    return amap, amap == 1.0, amap == LEVEL


def _case(preset: str) -> CaseData:
    """Only what the mask stage reads: the mode, the grid (from the schedule) and the preset."""
    spec = CaseSpec(image="unused.png", prompt="a red circle", edit_prompt="a green circle", mode="auto",
                    target_word="circle", resolution="0.06M")
    schedule = schedules.get_schedule(1.0, "0.06M")
    return CaseData(spec=spec, schedule=schedule, image=None, raw_features=None, bits=[], text={},
                    target_range=(2, 3), user_cells=None, user_pixels=None, run_id="r", preset=preset)


def test_an_unset_threshold_is_the_case_presets():
    toy, tiny = _case("toy"), _case("tiny")
    amap, peak, ring = _map(toy.grid)
    assert ring.sum() > 0 and peak.sum() > 0
    toy_mask, _ = edit_weights(toy, amap)
    tiny_mask, _ = edit_weights(tiny, amap)
    assert toy_mask[ring].all() and toy_mask[peak].all()  # toy's cut takes the edge cells
    assert not tiny_mask[ring].any() and tiny_mask[peak].all()  # the method's 0.5 leaves them out
    assert torch.equal(toy_mask, edit_weights(toy, amap, TOY)[0])  # exactly the preset's value
    assert torch.equal(tiny_mask, edit_weights(tiny, amap, TINY)[0])


def test_a_given_threshold_wins_over_the_presets():
    amap, _, ring = _map(_case("toy").grid)
    assert not edit_weights(_case("toy"), amap, TINY)[0][ring].any()
    assert edit_weights(_case("tiny"), amap, TOY)[0][ring].all()


# -- over files: the mask stage, the CLI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case_dirs(tmp_path_factory, example) -> dict[str, Path]:
    """A prepared tiny case (mode auto) and the same case saying it was prepared by the toy preset (the mask stage
    reads only the preset's name), each with an attention stage holding the map of :func:`_map`."""
    from editinfinity.edit import stages
    from editinfinity.edit.artifacts import stage_output
    from editinfinity.edit.attention import ATTENTION_FILE
    from editinfinity.edit.prepare import load_case
    from editinfinity.models.bundle import load_models

    root = tmp_path_factory.mktemp("threshold")
    tiny = stages.prepare(root / "tiny", image=example["image"], prompt=example["prompt"],
                          edit_prompt=example["edit_prompt"], mode="auto", target_word=example["target_word"],
                          models=load_models("tiny", device="cpu"))
    toy = root / "toy"
    shutil.copytree(tiny, toy)
    meta = json.loads((toy / "case.json").read_text())
    meta["preset"] = "toy"
    (toy / "case.json").write_text(json.dumps(meta))
    case = load_case(tiny)
    amap, _, _ = _map(case.grid)
    with stage_output(root / "attention", "attention", run_id=case.run_id) as (tmp, _record):
        save_file({"attention": amap.contiguous()}, str(tmp / ATTENTION_FILE))
    return {"tiny": tiny, "toy": toy, "attention": root / "attention"}


def _mask_record(mask_dir: Path) -> tuple[dict, torch.Tensor]:
    from editinfinity.edit.masking import load_weights

    return json.loads((mask_dir / "stage.json").read_text())["settings"], load_weights(mask_dir)[0]


@pytest.mark.parametrize("preset", ["toy", "tiny"])
def test_the_mask_stage_records_the_threshold_it_used(case_dirs, tmp_path, preset):
    make_mask(case_dirs[preset], tmp_path / "unset", attention_dir=case_dirs["attention"])
    settings, edit = _mask_record(tmp_path / "unset")
    assert settings["threshold"] == mask_threshold_for(preset) and settings["threshold_source"] == "preset"
    _, _, ring = _map(tuple(edit.shape))
    assert bool(edit[ring].all()) == (preset == "toy")
    make_mask(case_dirs[preset], tmp_path / "given", attention_dir=case_dirs["attention"], threshold=0.45)
    settings, _ = _mask_record(tmp_path / "given")
    assert settings["threshold"] == 0.45 and settings["threshold_source"] == "given"


def test_the_mask_command_takes_the_presets_or_the_given_threshold(case_dirs, tmp_path):
    args = ["mask", "--case-dir", str(case_dirs["toy"]), "--attention-dir", str(case_dirs["attention"])]
    assert main([*args, "--out", str(tmp_path / "unset")]) == 0
    assert _mask_record(tmp_path / "unset")[0]["threshold"] == TOY
    assert main([*args, "--out", str(tmp_path / "given"), "--threshold", "0.45"]) == 0
    given = _mask_record(tmp_path / "given")[0]
    assert given["threshold"] == 0.45 and given["threshold_source"] == "given"


FAST = ["--prompt-iters", "1", "--lora-iters", "1", "--preset", "tiny", "-q"]


def test_an_edit_shows_the_threshold_used_and_honours_a_case_files(tmp_path, example):
    """Unset: the summary and the report show the preset's number (not ``None``); a case file's ``threshold``
    reaches the mask stage."""
    args = ["edit", "--image", example["image"], "--prompt", example["prompt"], "--edit-prompt",
            example["edit_prompt"], "--target-word", example["target_word"], *FAST]
    assert main([*args, "--out", str(tmp_path / "unset")]) == 0
    summary = json.loads((tmp_path / "unset" / "summary.json").read_text())
    assert summary["settings"]["threshold"] == TINY
    assert json.loads((tmp_path / "unset" / "stages" / "mask" / "stage.json").read_text())["settings"][
        "threshold_source"] == "preset"
    for stage in sorted((tmp_path / "unset" / "stages").iterdir()):  # only the mask stage uses it
        if stage.name != "mask":
            record = json.loads((stage / "stage.json").read_text())["settings"]
            assert "threshold" not in record, (stage.name, record)
            if stage.name in ("prompt", "lora", "generate"):
                assert record["seed"] == summary["settings"]["seed"], stage.name
    html = (tmp_path / "unset" / "report.html").read_text()
    assert f"<th>threshold</th><td>{TINY:.6g}</td>" in html

    case_file = tmp_path / "case.yaml"
    case_file.write_text(yaml.safe_dump({"image": example["image"], "prompt": example["prompt"],
                                         "edit_prompt": example["edit_prompt"],
                                         "target_word": example["target_word"], "threshold": 0.45}))
    assert main(["edit", "--case", str(case_file), "--out", str(tmp_path / "file"), *FAST]) == 0
    mask = json.loads((tmp_path / "file" / "stages" / "mask" / "stage.json").read_text())["settings"]
    assert mask["threshold"] == 0.45 and mask["threshold_source"] == "given"
    assert json.loads((tmp_path / "file" / "summary.json").read_text())["settings"]["threshold"] == 0.45


def test_cli_help_names_the_presets_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{TOY} for toy" in text and f"{Preset.mask_threshold} (the method's) otherwise" in text


def test_toy_eval_variants_take_a_threshold():
    from editinfinity.evaluation.toy_eval import parse_variant

    name, settings, changes = parse_variant("t35:threshold=0.35", EditSettings.from_profile("default"))
    assert (name, settings.threshold, changes) == ("t35", 0.35, {"threshold": 0.35})
    with pytest.raises(InvalidCaseError):
        parse_variant("bad:threshold=2", EditSettings.from_profile("default"))



def test_toy_eval_variants_take_a_band_and_a_threshold_together():
    from editinfinity.evaluation.toy_eval import parse_variant

    name, settings, changes = parse_variant("ref:band=reference,threshold=0.3", EditSettings.from_profile("default"))
    assert (settings.band, settings.threshold, changes) == ("reference", 0.3, {"band": "reference", "threshold": 0.3})
    with pytest.raises(InvalidCaseError, match="--band"):
        parse_variant("bad:band=wide", EditSettings.from_profile("default"))
