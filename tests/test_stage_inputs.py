"""Which text, inputs and adapter each stage gives the transformer (as the published training and edit scripts run
them), read from what the transformer receives: prompt tuning and LoRA train on the styled source prompt plus the learned rows, with
self-corrected (flipped) inputs; attention reads the plain source prompt with no rows and no LoRA, teacher-forced
on the source codes; generation samples from the styled edit prompt plus the rows, with the adapter applied."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from editinfinity.edit.attention import attention_map
from editinfinity.edit.generate import generate_edit
from editinfinity.edit.lora import train_lora_adapter
from editinfinity.edit.prompt_tuning import tune_prompt_embedding
from editinfinity.edit.settings import EditSettings
from editinfinity.models.quantizer import inputs_from_bits, multiscale_quantize
from selfcorrection import flip_fractions, read_noisy_chain
from stagecase import lora_weights, tiny_models_and_case


@pytest.fixture(scope="module")
def tiny():
    models, case = tiny_models_and_case()
    t = case.text
    # the prompts this file tells apart really differ
    assert not torch.equal(t["source_styled"].features, t["edit_styled"].features)
    assert t["source_plain"].lens != t["source_styled"].lens
    return models, case


class Seen:
    """Records every forward / generate call of the transformer: text, inputs, labels and LoRA state."""

    def __init__(self, monkeypatch, transformer):
        self.forward, self.generate, self.labels = [], [], []
        self.handle = transformer.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        original_generate, original_loss = transformer.generate, transformer.bit_loss

        def generate(text, *args, **kwargs):
            self.generate.append(self._entry(transformer, text))
            return original_generate(text, *args, **kwargs)

        def bit_loss(logits, gt_bits, *args, **kwargs):
            self.labels.append(gt_bits.detach().clone())
            return original_loss(logits, gt_bits, *args, **kwargs)

        monkeypatch.setattr(transformer, "generate", generate)
        monkeypatch.setattr(transformer, "bit_loss", bit_loss)

    @staticmethod
    def _entry(module, text, x=None):
        return {"text": text.features.detach().clone(), "lens": list(text.lens),
                "x": None if x is None else x.detach().clone(),
                "lora_layers": sum(isinstance(m, LoraLayer) for m in module.modules()), "lora": lora_weights(module)}

    def _on_forward(self, module, args, kwargs):
        self.forward.append(self._entry(module, args[0], args[1]))


@pytest.fixture
def seen(monkeypatch, tiny):
    s = Seen(monkeypatch, tiny[0].transformer)
    yield s
    s.handle.remove()


def _expected(case, variant, rows=None, batch=1):
    base = case.text[variant].features
    one = base if rows is None else torch.cat([base, rows])
    return one.repeat(batch, 1), [one.shape[0]] * batch


def test_prompt_tuning_trains_the_styled_source_prompt_plus_rows_on_flipped_inputs(tiny, seen):
    models, case = tiny
    settings = EditSettings(prompt_iters=3, style_rows=5)  # noise on, as by default
    rows, _ = tune_prompt_embedding(models, case, settings, progress=False)
    assert len(seen.forward) == 3 == len(seen.labels)
    clean = multiscale_quantize(case.raw_features, case.schedule)
    flips = []
    for step, call in enumerate(seen.forward):
        features, lens = _expected(case, "source_styled", call["text"][-5:])
        assert call["lens"] == lens and torch.equal(call["text"], features), f"update {step}: not source_styled+rows"
        assert call["lora_layers"] == 0
        chain = read_noisy_chain(case.raw_features, case.schedule, seen.labels[step], call["x"])
        assert all(torch.equal(e, lab) for e, lab in zip(chain.expected_labels, chain.labels, strict=True))
        flips.append(max(flip_fractions(chain)))
        assert not torch.equal(call["x"], clean.x_wo_prefix), f"update {step} got the clean inputs"
    assert min(flips) > 0  # every update saw flipped codes
    assert torch.equal(seen.forward[0]["text"][-5:], torch.zeros(5, rows.shape[1]))  # rows start at zero
    assert not torch.equal(seen.forward[-1]["text"][-5:], seen.forward[0]["text"][-5:])  # and are the learned ones


@pytest.mark.parametrize("profile", ["default", "reference"])
def test_lora_trains_the_styled_source_prompt_plus_rows_with_the_adapter(tiny, seen, profile):
    models, case = tiny
    settings = EditSettings.from_profile(profile, lora_iters=2, style_rows=4)
    rows = 0.1 * torch.randn(4, case.text["source_styled"].channels, generator=torch.Generator().manual_seed(1))
    train_lora_adapter(models, case, rows, settings, progress=False)
    assert len(seen.forward) == 2
    features, lens = _expected(case, "source_styled", rows, batch=settings.lora_batch)
    for call in seen.forward:
        assert call["lens"] == lens and torch.equal(call["text"], features)
        assert call["lora_layers"] > 0
        clean = multiscale_quantize(case.raw_features, case.schedule).x_wo_prefix.expand(settings.lora_batch, -1, -1)
        assert not torch.equal(call["x"], clean)  # self-corrected inputs


def test_attention_reads_the_plain_source_prompt_without_rows_or_lora(tiny, seen):
    models, case = tiny
    attention_map(models, case)
    assert len(seen.forward) == 1
    call = seen.forward[0]
    features, lens = _expected(case, "source_plain")
    assert call["lens"] == lens and torch.equal(call["text"], features)
    assert call["lora_layers"] == 0
    assert torch.equal(call["x"], inputs_from_bits(case.bits, case.schedule))  # the source's exact codes


@pytest.mark.parametrize("with_rows", [True, False])
def test_generation_samples_the_styled_edit_prompt_plus_rows_with_the_adapter(tiny, seen, with_rows):
    models, case = tiny
    settings = EditSettings(lora_iters=1, style_rows=4, seed=1)
    rows = 0.1 * torch.randn(4, case.text["edit_styled"].channels, generator=torch.Generator().manual_seed(2))
    adapter, _ = train_lora_adapter(models, case, rows, settings, progress=False)
    adapter = {k: v + 0.01 for k, v in adapter.items()}  # every tensor non-zero and unlike a fresh init
    seen.forward.clear()
    generate_edit(models, case, rows if with_rows else None, adapter, torch.zeros(case.grid), settings)
    assert len(seen.generate) == 1
    call = seen.generate[0]
    features, lens = _expected(case, "edit_styled", rows if with_rows else None)
    assert call["lens"] == lens and torch.equal(call["text"], features)
    assert call["lora"].keys() == adapter.keys()
    assert all(torch.equal(call["lora"][k], adapter[k]) for k in adapter)
    assert not any(isinstance(m, LoraLayer) for m in models.transformer.modules())  # removed afterwards


def test_generation_with_the_adapter_runs_without_lora_dropout_and_repeats_exactly(tiny):
    """An adapter applied for generation takes the model's eval mode (peft builds its dropout in train mode): no
    LoRA dropout at inference, so the same seed gives the same codes every call."""
    models, case = tiny
    settings = EditSettings(lora_iters=1, style_rows=4, seed=1, lora_dropout=0.5)
    rows = 0.1 * torch.randn(4, case.text["edit_styled"].channels, generator=torch.Generator().manual_seed(2))
    adapter, _ = train_lora_adapter(models, case, rows, settings, progress=False)
    adapter = {k: v + 0.05 for k, v in adapter.items()}  # an adapter that changes the outputs
    modes = []
    original = models.transformer.generate

    def generate(*args, **kwargs):
        modes.append({m.training for m in models.transformer.modules()})
        return original(*args, **kwargs)

    models.transformer.generate = generate
    try:
        runs = [generate_edit(models, case, rows, adapter, torch.zeros(case.grid), settings) for _ in range(2)]
    finally:
        del models.transformer.generate
    assert modes == [{False}, {False}]
    assert torch.equal(runs[0].edited_codes, runs[1].edited_codes)
