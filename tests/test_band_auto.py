"""``band="auto"``: the edit generated once per distinct smoothing band with the same noise, the one the base model
scores closest to the edit prompt kept (edit.likelihood); tiny preset on CPU."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from editinfinity.cli import main
from editinfinity.edit import mask as M
from editinfinity.edit.generate import generate_edit
from editinfinity.edit.likelihood import SCORED_PROMPTS, edit_contrast, prompt_cross_entropy
from editinfinity.edit.masking import band_weights
from editinfinity.edit.settings import BAND_SETTINGS, EditSettings
from editinfinity.errors import StageError
from editinfinity.models import schedules
from editinfinity.models.quantizer import scale_codes_on_grid
from stagecase import tiny_models_and_case

FAST = ["--prompt-iters", "1", "--lora-iters", "1", "--preset", "tiny", "-q"]


def _grid(resolution: str) -> tuple[int, int]:
    return tuple(schedules.get_schedule(1.0, resolution)[-1][-2:])


def test_settings_spell_the_band_choices_of_the_mask_module():
    assert BAND_SETTINGS == M.BAND_CHOICES
    with pytest.raises(Exception, match="--band"):
        EditSettings.from_profile("default", band="wide")


def test_auto_tries_only_bands_that_differ_on_the_grid():
    grids = {res: _grid(res) for res in ("0.06M", "1M")}
    for res, grid in grids.items():
        kernels = [M.band_for_grid(grid, b) for b in M.BANDS]
        distinct = [b for i, b in enumerate(M.BANDS) if kernels[i] not in kernels[:i]]
        assert M.candidate_bands(grid, "auto") == distinct, res
        for b in M.BANDS:
            assert M.candidate_bands(grid, b) == [b]
    # the grids differ in how many bands are worth trying: equal distances on the large grid, two on the small one
    assert len(M.candidate_bands(grids["1M"], "auto")) == 1 and len(M.candidate_bands(grids["0.06M"], "auto")) == 2
    with pytest.raises(ValueError, match="band"):
        M.candidate_bands(grids["1M"], "wide")


@pytest.fixture(scope="module")
def tiny():
    return tiny_models_and_case("auto")


def test_band_weights_per_candidate_match_the_single_band_maps(tiny):
    _, case = tiny
    edit = torch.zeros(case.grid, dtype=torch.bool)
    edit[case.grid[0] // 3: case.grid[0] // 2, case.grid[1] // 3: case.grid[1] // 2] = True
    auto = band_weights(case, edit, "auto")
    assert list(auto) == M.candidate_bands(case.grid, "auto")
    for name, w in auto.items():
        assert torch.equal(w, band_weights(case, edit, name)[name])
    assert not torch.equal(*auto.values())  # the candidates differ on this grid


def test_auto_keeps_one_candidate_exactly_as_if_it_alone_had_been_asked(tiny):
    models, case = tiny
    edit = torch.zeros(case.grid, dtype=torch.bool)
    edit[2:6, 3:8] = True
    candidates = band_weights(case, edit, "auto")
    settings = EditSettings(seed=5)
    res = generate_edit(models, case, None, None, candidates, settings)
    chosen = res.band["chosen"]
    assert chosen in candidates and set(res.band["candidates"]) == set(candidates)
    assert torch.equal(res.weights, candidates[chosen])
    alone = generate_edit(models, case, None, None, candidates[chosen], settings)
    assert alone.band is None
    assert np.array_equal(np.asarray(res.edited), np.asarray(alone.edited))
    assert torch.equal(res.edited_codes, alone.edited_codes)
    # the rule: the lowest edit-minus-source cross-entropy, recomputed from the kept pictures
    contrasts = {}
    for name, w in candidates.items():
        pic = generate_edit(models, case, None, None, w, settings).edited
        scores = prompt_cross_entropy(models, case, pic)
        assert set(scores) == set(SCORED_PROMPTS)
        assert scores == pytest.approx({k: v for k, v in res.band["candidates"][name].items() if k in scores},
                                       abs=1e-5)
        contrasts[name] = edit_contrast(scores)
    assert chosen == min(contrasts, key=contrasts.get)
    # where the kept band's weight is 1 the edited codes are the source codes
    source = scale_codes_on_grid(case.bits, case.schedule)
    keep = candidates[chosen] == 1
    assert keep.any()
    assert torch.equal(res.edited_codes[0][:, keep], sum(source)[0][:, keep])


def test_one_candidate_is_the_plain_edit(tiny):
    models, case = tiny
    w = torch.ones(case.grid)
    w[4:8, 4:8] = 0
    one = generate_edit(models, case, None, None, {"scaled": w}, EditSettings(seed=1))
    plain = generate_edit(models, case, None, None, w, EditSettings(seed=1))
    assert one.band is None and np.array_equal(np.asarray(one.edited), np.asarray(plain.edited))


def test_scoring_needs_the_plain_edit_prompt_of_a_current_prepare(tiny):
    models, case = tiny
    old = dataclasses.replace(case, text={k: v for k, v in case.text.items() if k != "edit_plain"})
    with pytest.raises(StageError, match="re-run prepare"):
        prompt_cross_entropy(models, old, case.image)
    with pytest.raises(ValueError, match="picture is"):
        prompt_cross_entropy(models, case, case.image.resize((case.image.width // 2, case.image.height // 2)))


def test_cli_edit_with_band_auto_reports_the_kept_band(tmp_path, example):
    out = tmp_path / "auto"
    assert main(["edit", "--image", example["image"], "--prompt", example["prompt"], "--edit-prompt",
                 example["edit_prompt"], "--target-word", example["target_word"], "--band", "auto",
                 "--resolution", "0.06M", "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    band = summary["band"]
    assert band["chosen"] in band["candidates"] and len(band["candidates"]) == 2
    assert summary["settings"]["band"] == "auto"
    gen = out / "stages" / "generate"
    kept = load_file(gen / "weights.safetensors")["weights"]
    mask_record = json.loads((out / "stages" / "mask" / "stage.json").read_text())
    assert set(mask_record["settings"]["candidates"]) == set(band["candidates"])
    # the report's weights picture is the kept band's
    assert np.array_equal(np.asarray(Image.open(out / "weights.png")), np.asarray(Image.open(gen / "weights.png")))
    assert kept.shape == load_file(out / "stages" / "mask" / "weights.safetensors")["weights"].shape
