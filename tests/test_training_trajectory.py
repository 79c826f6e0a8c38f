"""A few prompt-tuning and LoRA updates, step by step, against a hand-run optimiser.

Noise, condition dropout, DropPath and LoRA dropout are off, so a stage is deterministic. The independent
computation builds the same objective from the model's forward and the loss functions, then runs
``torch.optim.AdamW`` + ``clip_grad_norm_`` itself (docs/method.md, "Settings"): it never calls the stage's
update loop. The stage's values after each update are recorded from the transformer's inputs (the learned rows are
in its text; the LoRA tensors are read when it runs), its final values from what it returns.

Tolerance: both sides run the same float32 kernels in the same order, so they agree to float32 round-off; an
element moves by at most about ``lr`` per Adam update, and ``TOL * lr`` (1e-3 of one update) separates round-off
from a changed update (a missed ``zero_grad``, a different clip, betas, weight decay or objective all move some
element by a sizeable fraction of ``lr`` within two updates).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from editinfinity.edit.lora import remove_lora, train_lora_adapter
from editinfinity.edit.prompt_tuning import tune_prompt_embedding
from editinfinity.edit.settings import EditSettings
from editinfinity.models.infinity import bit_loss, summed_bit_ce
from editinfinity.models.presets import PRESETS
from editinfinity.models.quantizer import multiscale_quantize
from editinfinity.models.text import TextFeatures
from stagecase import lora_weights, tiny_models_and_case

TOL = 1e-3
STEPS = 3
DETERMINISTIC = dict(noise_strength=0.0, cond_drop_rate=0.0, drop_path_rate=0.0, lora_dropout=0.0)
# Every optimiser knob away from its default, a strong KL term, and a clip far below the gradient norm (asserted).
KNOBS = dict(lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.5, grad_clip=1e-3, kl_weight=0.05, style_rows=3)


@pytest.fixture(scope="module")
def tiny():
    return tiny_models_and_case()


def _settings(profile: str) -> EditSettings:
    if profile == "knobs":
        return EditSettings.from_profile("default", **DETERMINISTIC, **KNOBS)
    return EditSettings.from_profile(profile, **DETERMINISTIC)


def _lr(settings: EditSettings, models) -> float:
    return settings.lr if settings.lr is not None else PRESETS[models.preset].edit_lr


@contextlib.contextmanager
def _train(transformer):
    transformer.set_regularization(cond_drop_rate=0.0, drop_path_rate=0.0)
    transformer.train()
    try:
        yield
    finally:
        transformer.eval()


def _record_text(transformer, into: list):
    def hook(module, args, kwargs):
        into.append((args[0].features.detach().clone(), list(args[0].lens), lora_weights(module)))
    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _hand_run(models, case, settings, params, text_of, steps, kl: bool):
    """AdamW + clip over the objective; returns (values after 0..steps updates, gradient norms before clipping)."""
    t = models.transformer
    clean = multiscale_quantize(case.raw_features, case.schedule)  # noise off: the clean chain
    batch = text_of().batch_size
    x, gt = clean.x_wo_prefix.expand(batch, -1, -1), clean.gt_bits.expand(batch, -1, -1)
    opt = torch.optim.AdamW(list(params.values()), lr=_lr(settings, models), betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay)
    history, norms = [{k: p.detach().clone() for k, p in params.items()}], []
    with _train(t):
        for _ in range(steps):
            with models.autocast():
                logits = t(text_of(), x, case.schedule).float()
            loss = bit_loss(logits, gt, case.schedule)
            if kl:
                loss = loss + settings.kl_weight * summed_bit_ce(logits, gt)
            opt.zero_grad()
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), settings.grad_clip)))
            opt.step()
            history.append({k: p.detach().clone() for k, p in params.items()})
    return history, norms


def _assert_close_per_step(ours: list[dict], hand: list[dict], lr: float, what: str):
    assert len(ours) == len(hand)
    for step, (a, b) in enumerate(zip(ours, hand, strict=True)):
        assert a.keys() == b.keys(), what
        for k in a:
            err = float((a[k] - b[k]).abs().max())
            assert err <= TOL * lr, f"{what} {k} after {step} update(s): max |diff| {err:.3g} > {TOL * lr:.3g}"
    moved = float(max((hand[-1][k] - hand[0][k]).abs().max() for k in hand[0]))
    assert moved > 0.5 * lr, f"{what} barely moved ({moved:.3g}); the comparison would not see a wrong update"


@pytest.mark.parametrize("profile", ["knobs", "default", "reference"])
def test_prompt_tuning_updates_match_hand_run_adamw(tiny, profile):
    models, case = tiny
    settings = _settings(profile)
    settings.prompt_iters = STEPS
    seen: list = []
    handle = _record_text(models.transformer, seen)
    try:
        rows, losses = tune_prompt_embedding(models, case, settings, progress=False)
    finally:
        handle.remove()
    assert len(losses) == STEPS == len(seen)
    # the rows the stage used at each update are the last style_rows rows of the text it fed the transformer
    ours = [{"rows": feats[-settings.style_rows:]} for feats, _, _ in seen] + [{"rows": rows}]

    prefix = case.text["source_styled"].features
    hand_rows = torch.zeros(settings.style_rows, prefix.shape[1], requires_grad=True)

    def text_of():
        return TextFeatures(torch.cat([prefix, hand_rows]), [prefix.shape[0] + settings.style_rows])

    hand, norms = _hand_run(models, case, settings, {"rows": hand_rows}, text_of, STEPS, kl=False)
    if profile == "knobs":
        assert min(norms) > 10 * settings.grad_clip  # the clip really acts in this run
    _assert_close_per_step(ours, hand, _lr(settings, models), "prompt rows")


@pytest.mark.parametrize("profile", ["knobs", "default", "reference"])
def test_lora_updates_match_hand_run_adamw(tiny, profile):
    models, case = tiny
    settings = _settings(profile)
    settings.lora_iters = STEPS
    channels = case.text["source_styled"].channels
    rows = 0.1 * torch.randn(settings.style_rows, channels, generator=torch.Generator().manual_seed(4))
    seen: list = []
    handle = _record_text(models.transformer, seen)
    try:
        state, losses = train_lora_adapter(models, case, rows, settings, progress=False)
    finally:
        handle.remove()
    assert len(losses) == STEPS == len(seen)
    ours = [w for _, _, w in seen] + [state]

    # The adapter of the method (docs/method.md, "Settings"): fc1 and fc2 of every block, Kaiming-uniform A from
    # the stage seed, B zero; injected here with peft directly.
    t = models.transformer
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                        target_modules=["fc1", "fc2"], init_lora_weights=True, bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        inject_adapter_in_model(config, t, adapter_name="default")
    try:
        params = {n.replace(".default", ""): p.requires_grad_(True) for n, p in t.named_parameters() if "lora_" in n}
        prefix = case.text["source_styled"].features
        one = torch.cat([prefix, rows])

        def text_of():
            return TextFeatures(one.repeat(settings.lora_batch, 1), [one.shape[0]] * settings.lora_batch)

        hand, norms = _hand_run(models, case, settings, params, text_of, STEPS, kl=True)
    finally:
        remove_lora(t)
    if profile == "knobs":
        assert min(norms) > 10 * settings.grad_clip
    assert any("lora_A" in k for k in hand[0]) and any("lora_B" in k for k in hand[0])
    _assert_close_per_step(ours, hand, _lr(settings, models), "LoRA")
