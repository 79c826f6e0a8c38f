"""The defaults that make the method are the ones written in docs/method.md ("Settings"): a changed default is a
decision made in both places, not an accident. Every value is read from the document's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from editinfinity.edit.lora import TARGETS, lora_config
from editinfinity.edit.settings import EditSettings
from editinfinity.edit.training import learning_rate

DOC = Path(__file__).resolve().parents[1] / "docs" / "method.md"
PROFILES = ("default", "reference")


def _value(text: str):
    text = text.strip()
    if text == "all":
        return None
    if text in ("on", "off"):
        return text == "on"
    if "," in text:
        return tuple(_value(part) for part in text.split(","))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def settings_table() -> dict[str, dict[str, object]]:
    """{field: {profile: value}} from the table under the "## Settings" heading."""
    lines = DOC.read_text().splitlines()
    start = lines.index("## Settings")
    rows = [ln for ln in lines[start + 1:] if ln.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table: dict[str, dict[str, object]] = {}
    for row in rows[2:]:
        cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|")), strict=False))
        field = re.fullmatch(r"`(\w+)`", cells["Field"]).group(1)
        table[field] = {p: _value(cells[p]) for p in PROFILES}
        if not cells["Where the value comes from"]:
            raise AssertionError(f"docs/method.md: the {field} row says not where its value comes from")
    return table


@pytest.fixture(scope="module")
def table():
    return settings_table()


def test_the_table_covers_the_settings_of_the_method(table):
    needed = {"prompt_iters", "style_rows", "lora_iters", "lora_rank", "lora_alpha", "lora_dropout", "lora_batch",
              "kl_weight", "lr", "betas", "eps", "weight_decay", "grad_clip", "noise_strength", "noise_layers",
              "cond_drop_rate", "drop_path_rate", "TARGETS"}
    assert needed <= table.keys(), sorted(needed - table.keys())


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_defaults_are_the_documented_values(table, profile):
    settings = EditSettings.from_profile(profile)
    for field, values in table.items():
        want = values[profile]
        if field == "lr":  # unset: the preset's rate (Preset.edit_lr); the Infinity family's is the documented one
            got = learning_rate(settings)
        elif field == "threshold":  # unset: the preset's (Preset.mask_threshold); the method's for a non-preset
            assert settings.threshold is None
            got = settings.mask_threshold(None)
        elif field == "TARGETS":
            got, want = sorted(lora_config(settings).target_modules), sorted(want)
            assert sorted(TARGETS) == want
        else:
            got = getattr(settings, field)
        if isinstance(want, float) or isinstance(got, float):
            assert got == pytest.approx(want, rel=1e-12, abs=0), f"{profile}.{field}: code {got!r}, docs {want!r}"
        else:
            assert got == want, f"{profile}.{field}: code {got!r}, docs {want!r}"
