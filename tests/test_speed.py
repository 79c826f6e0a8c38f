"""Speed and memory switches (CPU): bf16 frozen weights, activation checkpointing, the cached text path, the
sync-free loss bookkeeping, torch.compile of the training blocks, and the settings/CLI that select them.

Each switch must leave the computation unchanged: exactly where the arithmetic is the same (storage dtype under
autocast, checkpoint recomputation, the text cache, the loss table), to float32 round-off where kernels are fused
(compile).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from editinfinity.cli import _settings, build_parser
from editinfinity.demo import example_dir
from editinfinity.edit.case import CaseSpec
from editinfinity.edit.lora import lora_adapter, lora_config, lora_parameters, train_lora_adapter
from editinfinity.edit.prepare import prepare_case
from editinfinity.edit.prompt_tuning import tune_prompt_embedding
from editinfinity.edit.run import run_edit
from editinfinity.edit.settings import EditSettings, compile_enabled, parse_checkpointing
from editinfinity.edit.training import attention_backend, checkpoint_block_count, optimize, training_mode
from editinfinity.errors import InvalidCaseError
from editinfinity.models import schedules
from editinfinity.models.bundle import load_models, resolve_frozen_dtype
from editinfinity.models.infinity import Infinity, TextConditionCache, bit_loss
from editinfinity.models.layers import key_padding_mask
from editinfinity.models.quantizer import inputs_from_bits
from editinfinity.models.text import TextFeatures

D_BITS = 8
CT5 = 128
SCHEDULE = schedules.get_schedule(1.0, "0.06M")[:5]  # 1, 2x2, 4x4, 6x6, 8x8 -> L = 121


def make_model(depth: int = 3, **overrides) -> Infinity:
    kwargs = dict(depth=depth, embed_dim=64, num_heads=2, text_channels=CT5, codebook_dim=D_BITS, block_chunks=1)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = Infinity(**kwargs)
    model.init_weights(aln_init=1.0, aln_gamma_init=1.0, head_scale=1.0)  # every block matters
    return model.eval().requires_grad_(False)


def make_inputs(batch: int = 1, lens: tuple[int, ...] = (7,), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lens = list(lens) * batch if len(lens) == 1 else list(lens)
    text = TextFeatures(0.5 * torch.randn(sum(lens), CT5, generator=g), lens)
    bits = [torch.randint(0, 2, (len(lens), h, w, D_BITS), generator=g, dtype=torch.uint8) for _, h, w in SCHEDULE]
    gt = torch.cat([b.reshape(len(lens), -1, D_BITS) for b in bits], dim=1)
    return text, inputs_from_bits(bits, SCHEDULE), gt


def randomize_lora_b(model: torch.nn.Module) -> None:
    """peft starts B at zero (LoRA is then a no-op and A gets no gradient); give B values so both matter."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# -- bf16 storage of the frozen blocks ----------------------------------------------------------------------------


def test_cast_frozen_gives_identical_logits_under_bf16_autocast():
    m = make_model()
    text, x, _ = make_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = m(text, x, SCHEDULE)
    m.cast_frozen(torch.bfloat16)
    assert m.frozen_dtype == torch.bfloat16
    for name, p in m.named_parameters():
        in_block_linear = name.startswith("blocks.") and any(
            k in name for k in ("mat_qkv", "sa.proj", "mat_q.", "mat_kv", "ca.proj", "fc1", "fc2"))
        assert p.dtype == (torch.bfloat16 if in_block_linear else torch.float32), name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = m(text, x, SCHEDULE)
    assert torch.equal(before, after)  # autocast rounds float32 weights to bf16 exactly as the storage does
    m.cast_frozen(torch.float32)
    assert m.frozen_dtype == torch.float32


def test_lora_init_does_not_depend_on_base_dtype():
    settings = EditSettings()
    states = []
    for dtype in (torch.float32, torch.bfloat16):
        m = make_model().cast_frozen(dtype)
        with lora_adapter(m, lora_config(settings), seed=3) as mm:
            states.append({n: p.detach().clone() for n, p in mm.named_parameters() if "lora_" in n})
            base = mm.blocks[0].ffn.fc1.get_base_layer()
            assert base.weight.dtype == dtype and base.weight.shape == (256, 64)  # real weights are back
        assert m.blocks[0].ffn.fc1.weight.dtype == dtype
    assert states[0].keys() == states[1].keys() and states[0]
    for name, value in states[0].items():
        assert value.dtype == states[1][name].dtype == torch.float32
        assert torch.equal(value, states[1][name]), name


def test_bf16_frozen_base_training_step_keeps_float32_trainables():
    """A LoRA update and a prompt-row update on a bf16 frozen base (CPU bf16 autocast): gradients are float32."""
    m = make_model(drop_path_rate=0.1)
    m.cast_frozen(torch.bfloat16)
    text, x, gt = make_inputs()
    settings = EditSettings()
    with lora_adapter(m, lora_config(settings), seed=0) as mm:
        randomize_lora_b(mm)
        params = lora_parameters(mm)
        mm.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = mm(text, x, SCHEDULE, generator=torch.Generator().manual_seed(0))
        loss = mm.bit_loss(logits.float(), gt, SCHEDULE)
        loss.backward()
        mm.eval()
        assert torch.isfinite(loss)
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        assert all(p.grad.abs().sum() > 0 for p in params)
        assert mm.blocks[0].ffn.fc2.get_base_layer().weight.grad is None
    rows = torch.zeros(3, CT5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(text.append_rows(rows), x, SCHEDULE)
    m.bit_loss(logits.float(), gt, SCHEDULE).backward()
    assert rows.grad is not None and rows.grad.dtype == torch.float32 and rows.grad.abs().sum() > 0


def test_edit_learning_rate_comes_from_the_preset_unless_set():
    from editinfinity.edit.training import learning_rate
    from editinfinity.models import presets
    from editinfinity.models.presets import get_preset

    tiny = load_models("tiny", device="cpu", text_encoder=False)
    assert learning_rate(EditSettings(), tiny) == get_preset("tiny").edit_lr == 6e-3 * 2 / 256  # the reference's
    assert learning_rate(EditSettings(lr=1e-4), tiny) == 1e-4
    original = presets.PRESETS["tiny"]
    presets.PRESETS["tiny"] = dataclasses.replace(original, edit_lr=1e-3)
    try:
        assert learning_rate(EditSettings(), tiny) == 1e-3
    finally:
        presets.PRESETS["tiny"] = original


def test_bundle_without_text_encoder_for_the_stages_after_prepare():
    full = load_models("tiny", device="cpu")
    light = load_models("tiny", device="cpu", text_encoder=False)
    assert light.text_encoder is None and full.text_encoder is not None
    a, b = full.transformer.state_dict(), light.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # skipping T5 leaves the other random weights unchanged
    ex = example_dir()
    case = json.loads((ex / "case.json").read_text())
    spec = CaseSpec(image=str(ex / case["image"]), prompt=case["prompt"], edit_prompt=case["edit_prompt"],
                    mode="whole", resolution="0.06M")
    with pytest.raises(Exception, match="text_encoder=True"):
        prepare_case(light, spec)


def test_bundle_dtype_resolution_and_float32_precision_switch():
    assert resolve_frozen_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_frozen_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_frozen_dtype("float32", torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_frozen_dtype("float16", torch.device("cpu"))
    models = load_models("tiny", device="cpu", dtype="bfloat16")
    assert models.frozen_dtype == torch.bfloat16 and models.transformer.frozen_dtype == torch.bfloat16
    assert models.autocast_dtype == torch.bfloat16  # a bf16 CPU bundle runs under CPU bf16 autocast
    assert next(models.text_encoder.parameters()).dtype == torch.bfloat16
    fp32 = dataclasses.replace(models, precision="float32")
    with fp32.autocast():  # puts the shared transformer back in float32 storage
        assert models.transformer.frozen_dtype == torch.float32
    with models.autocast():  # and the bf16 bundle takes it back
        assert models.transformer.frozen_dtype == torch.bfloat16
    assert load_models("tiny", device="cpu").frozen_dtype == torch.float32  # default on CPU: float32 (parity)
    models.offload_text_encoder()  # CPU bundles: nothing to move
    models.onload_text_encoder()


# -- activation checkpointing -------------------------------------------------------------------------------------


def _lora_loss_and_grads(m: Infinity, checkpoint: int, seed: int = 3, rows: torch.Tensor | None = None):
    text, x, gt = make_inputs(batch=2)
    m.set_regularization(cond_drop_rate=0.5, drop_path_rate=0.3)
    with lora_adapter(m, lora_config(EditSettings()), seed=0) as mm:
        randomize_lora_b(mm)
        params = lora_parameters(mm)
        mm.train()
        mm.set_activation_checkpointing(checkpoint)
        torch.manual_seed(11)  # LoRA dropout (global RNG)
        if rows is not None:
            rows.grad = None
            text = text.append_rows(rows)
        logits = mm(text, x, SCHEDULE, generator=torch.Generator().manual_seed(seed))
        loss = mm.bit_loss(logits, gt, SCHEDULE) + 1e-3 * mm.summed_bit_ce(logits, gt)
        loss.backward()
        mm.set_activation_checkpointing(0)
        mm.eval()
        grads = [p.grad.clone() for p in params]
        if rows is not None:  # no gradient when condition dropout replaced every sample's text
            grads.append(torch.zeros_like(rows) if rows.grad is None else rows.grad.clone())
    return loss.detach(), grads


@pytest.mark.parametrize("checkpoint", [1, 3])
def test_checkpointing_gives_the_same_loss_and_gradients(checkpoint):
    """Float32, train mode with DropPath, condition dropout and LoRA dropout all active."""
    m = make_model()
    rows = torch.zeros(2, CT5, requires_grad=True)
    for seed in (3, 4, 5):
        plain_loss, plain_grads = _lora_loss_and_grads(m, 0, seed, rows)
        ckpt_loss, ckpt_grads = _lora_loss_and_grads(m, checkpoint, seed, rows)
        assert torch.equal(plain_loss, ckpt_loss)
        assert len(plain_grads) == len(ckpt_grads) > 2
        for a, b in zip(plain_grads, ckpt_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert m.checkpoint_blocks == 0


def test_checkpointing_under_bf16_autocast_on_a_bf16_base():
    """The GPU configuration on the CPU: bf16 block weights, bf16 autocast, float32 LoRA; recomputation is exact."""
    m = make_model().cast_frozen(torch.bfloat16)
    text, x, gt = make_inputs(batch=2)
    m.set_regularization(cond_drop_rate=0.5, drop_path_rate=0.3)

    def run(checkpoint: int):
        with lora_adapter(m, lora_config(EditSettings()), seed=0) as mm:
            randomize_lora_b(mm)
            params = lora_parameters(mm)
            mm.train()
            mm.set_activation_checkpointing(checkpoint)
            torch.manual_seed(11)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = mm(text, x, SCHEDULE, generator=torch.Generator().manual_seed(4))
            loss = mm.bit_loss(logits.float(), gt, SCHEDULE)
            loss.backward()
            mm.set_activation_checkpointing(0)
            mm.eval()
            return loss.detach(), [p.grad.clone() for p in params]

    plain_loss, plain_grads = run(0)
    ckpt_loss, ckpt_grads = run(3)
    assert torch.equal(plain_loss, ckpt_loss)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(plain_grads, ckpt_grads, strict=True))


def test_checkpoint_block_count():
    tokens = schedules.num_tokens(schedules.get_schedule(1.0, "1M"))
    two_b = dict(depth=32, tokens=tokens, width=2048)
    assert checkpoint_block_count("none", **two_b) == 0
    assert checkpoint_block_count("all", **two_b) == 32
    assert checkpoint_block_count(8, **two_b) == 8
    assert checkpoint_block_count("40", **two_b) == 32
    assert checkpoint_block_count("auto", **two_b, device="cpu") == 0  # host memory: nothing to size
    gib = 2**30
    # 2B at 1M with bf16 weights + T5 resident (~7 GiB): some blocks, not all.
    n = checkpoint_block_count("auto", **two_b, device="cuda", allocated_bytes=7 * gib, free_bytes=130 * gib)
    assert 0 < n < 32
    per_block, per_ckpt = tokens * 2048 * 64, tokens * 2048 * 4
    peak = 7 * gib + (32 - n) * per_block + n * per_ckpt + 2 * gib
    assert peak <= 36 * gib < peak + per_block - per_ckpt  # the fewest blocks that fit
    assert checkpoint_block_count("auto", **two_b, device="cuda", allocated_bytes=7 * gib, free_bytes=3 * gib) == 32
    assert checkpoint_block_count("auto", **two_b, batch=2, device="cuda", allocated_bytes=7 * gib,
                                  free_bytes=130 * gib) > n
    # Compiled blocks keep fewer bytes: fewer blocks to checkpoint for the same budget.
    compiled = checkpoint_block_count("auto", **two_b, device="cuda", allocated_bytes=7 * gib, free_bytes=130 * gib,
                                      compiled=True)
    assert 0 < compiled < n
    small = dict(depth=32, tokens=schedules.num_tokens(schedules.get_schedule(1.0, "0.25M")), width=2048)
    assert checkpoint_block_count("auto", **small, device="cuda", allocated_bytes=7 * gib, free_bytes=130 * gib) == 0


# -- cached text path ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_text_cache_gives_identical_logits_and_draws(batch):
    m = make_model(cond_drop_rate=0.5, drop_path_rate=0.3)
    text, x, _ = make_inputs(batch=batch)
    cache = TextConditionCache(m, text)
    m.train()
    patterns = set()
    with torch.no_grad():
        for seed in range(8):
            g_plain, g_cached = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            patterns.add(tuple((torch.rand(batch, generator=torch.Generator().manual_seed(seed)) < 0.5).tolist()))
            plain = m(text, x, SCHEDULE, generator=g_plain)
            cached = m(text, x, SCHEDULE, generator=g_cached, text_cache=cache)
            assert torch.equal(plain, cached), seed
            assert torch.equal(g_plain.get_state(), g_cached.get_state())  # the same random draws were made
        m.eval()
        assert torch.equal(m(text, x, SCHEDULE), m(text, x, SCHEDULE, text_cache=cache))
    assert len(patterns) > 1  # both kept and dropped samples (mixed ones for batch 2) were exercised


def test_text_cache_refuses_a_trainable_text_path_and_other_texts():
    m = make_model()
    text, x, _ = make_inputs()
    with pytest.raises(ValueError, match="frozen text path"):
        TextConditionCache(m, text.append_rows(torch.zeros(2, CT5, requires_grad=True)))
    cache = TextConditionCache(m, text)
    longer = text.append_rows(torch.zeros(2, CT5))
    with pytest.raises(ValueError, match="text lengths"):
        m(longer, x, SCHEDULE, text_cache=cache)


def test_model_bit_loss_equals_the_function():
    m = make_model()
    text, x, gt = make_inputs(batch=2)
    with torch.no_grad():
        logits = m(text, x, SCHEDULE)
    for reweight in (True, False):
        assert torch.equal(m.bit_loss(logits, gt, SCHEDULE, reweight), bit_loss(logits, gt, SCHEDULE, reweight))
    with pytest.raises(ValueError, match="gt_bits"):
        m.bit_loss(logits, gt[:, :-1], SCHEDULE)


# -- the update loop ----------------------------------------------------------------------------------------------


def test_optimize_returns_every_loss_as_float():
    w = torch.nn.Parameter(torch.ones(3))
    settings = EditSettings(lr=0.1)
    losses = optimize([w], lambda step: (w * (step + 1)).pow(2).sum().double(), 4, settings, "test", progress=False)
    assert len(losses) == 4 and all(isinstance(v, float) for v in losses)
    assert losses[0] == pytest.approx(3.0)


@pytest.fixture(scope="module")
def tiny_case():
    models = load_models("tiny", device="cpu")
    ex = example_dir()
    spec = json.loads((ex / "case.json").read_text())
    case = prepare_case(models, CaseSpec(image=str(ex / spec["image"]), prompt=spec["prompt"],
                                         edit_prompt=spec["edit_prompt"], mode="auto", target_word=spec["target_word"],
                                         resolution="0.06M"))
    return models, case


def test_stages_on_a_bf16_frozen_base_cpu(tiny_case):
    """Prompt tuning and LoRA run end to end with bf16 block weights (CPU bf16 autocast), outputs float32."""
    models32, case = tiny_case
    models = dataclasses.replace(models32, frozen_dtype=torch.bfloat16)
    settings = EditSettings(prompt_iters=2, lora_iters=2, checkpointing="all")
    info: dict = {}
    try:
        rows, losses = tune_prompt_embedding(models, case, settings, progress=False, info=info)
        assert rows.dtype == torch.float32 and len(losses) == 2 and info["checkpoint_blocks"] == 2
        state, lora_losses = train_lora_adapter(models, case, rows, settings, progress=False, info=info)
        assert all(v.dtype == torch.float32 for v in state.values()) and len(lora_losses) == 2
        assert all(torch.isfinite(torch.tensor(v)) for v in losses + lora_losses)
        assert models.transformer.checkpoint_blocks == 0 and not models.transformer.training
    finally:
        models32.transformer.cast_frozen(torch.float32)


def test_lora_stage_matches_uncached_text_path(tiny_case):
    """The stage's cached text path and device-resident case give the losses of a plain per-step loop."""
    from editinfinity.edit.lora import lora_loss
    from editinfinity.edit.training import make_generator, training_mode

    models, case = tiny_case
    settings = EditSettings(lora_iters=3, cond_drop_rate=0.5)
    rows = torch.randn(settings.style_rows, case.text["source_styled"].channels) * 0.1
    _, cached = train_lora_adapter(models, case, rows, settings, progress=False)
    gen = make_generator(models.device, settings.seed)
    with lora_adapter(models.transformer, lora_config(settings), seed=settings.seed) as model:
        params = lora_parameters(model)
        with training_mode(model, settings):
            torch.manual_seed(settings.seed + 1)  # the stage seeds LoRA dropout (global RNG) this way
            plain = optimize(params, lambda _: lora_loss(models, case, rows, settings, gen), settings.lora_iters,
                             settings, "LoRA", progress=False)
    assert cached == plain


# -- compile ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_training_blocks_match_eager():
    """torch.compile of the training blocks (inductor on the CPU; random ops kept eager): same loss and gradients
    to float32 round-off, LoRA dropout included, with and without checkpointing; eval/no-grad stays eager."""
    torch._dynamo.reset()
    m = make_model()
    rows = torch.zeros(2, CT5, requires_grad=True)
    plain_loss, plain_grads = _lora_loss_and_grads(m, 0, 3, rows)
    m.set_block_compile(True)
    try:
        for checkpoint in (0, 2):
            loss, grads = _lora_loss_and_grads(m, checkpoint, 3, rows)
            torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
            for a, b in zip(plain_grads, grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        m.set_block_compile(False)


# -- settings and command line ------------------------------------------------------------------------------------


def test_settings_parse_and_round_trip():
    assert parse_checkpointing("AUTO") == "auto" and parse_checkpointing("12") == 12 and parse_checkpointing(3) == 3
    for bad in ("some", -1, "1.5", True):
        with pytest.raises(InvalidCaseError, match="checkpointing"):
            parse_checkpointing(bad)
    s = EditSettings.from_profile("default", checkpointing="8", low_memory=True)
    assert s.checkpointing == 8 and s.low_memory and s.effective_checkpointing == 8
    assert EditSettings(low_memory=True).effective_checkpointing == "all"
    assert EditSettings().effective_checkpointing == "auto" and EditSettings().compile == "auto"
    assert EditSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(InvalidCaseError):
        EditSettings.from_profile("default", checkpointing="lots")
    assert EditSettings.from_profile("default", attention_backend="cudnn").attention_backend == "cudnn"
    with pytest.raises(InvalidCaseError, match="attention_backend"):
        EditSettings.from_profile("default", attention_backend="fast")


def test_compile_setting_is_on_for_cuda_only_by_default():
    assert compile_enabled(EditSettings().compile, "cuda") and not compile_enabled(EditSettings().compile, "cpu")
    for value, on in ((True, True), ("on", True), ("TRUE", True), (False, False), ("off", False), ("0", False)):
        s = EditSettings.from_profile("default", compile=value)
        assert s.compile in ("on", "off")
        assert compile_enabled(s.compile, "cpu") is on and compile_enabled(s.compile, "cuda") is on
        assert EditSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(InvalidCaseError, match="compile"):
        EditSettings.from_profile("default", compile="fast")


def test_training_mode_compiles_only_where_the_setting_says():
    m = make_model()
    seen = []
    m.set_block_compile = lambda enabled: seen.append(enabled)  # record, compile nothing
    for setting, expected in (("auto", False), ("on", True), ("off", False)):
        seen.clear()
        with training_mode(m, EditSettings(compile=setting)):
            assert m.training
        assert seen == [expected, False], setting


def test_compile_cache_folder_and_portable_file(tmp_path, monkeypatch):
    """The cache folder follows EDITINFINITY_CACHE unless TORCHINDUCTOR_CACHE_DIR is set; a process that compiled
    nothing writes no portable file."""
    from editinfinity.models import compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("EDITINFINITY_CACHE", str(tmp_path / "cache"))
    assert compile_cache.compile_cache_dir() == tmp_path / "cache" / compile_cache.SUBDIR
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert compile_cache.compile_cache_dir() == tmp_path / "inductor"
    monkeypatch.setitem(compile_cache._state, "prepared", False)
    monkeypatch.setitem(compile_cache._state, "loaded", [])
    (tmp_path / "inductor").mkdir()
    (tmp_path / "inductor" / f"{compile_cache.MEGA_PREFIX}{compile_cache._torch_tag()}-broken.bin").write_bytes(b"x")
    assert compile_cache.prepare_compile_cache() == tmp_path / "inductor"  # a bad file is skipped, not fatal
    assert compile_cache._state["loaded"] == []
    stats = compile_cache.compile_cache_stats()
    monkeypatch.setitem(compile_cache._state, "misses_saved", stats["fxgraph_cache_miss"] + stats["autograd_cache_miss"])
    assert compile_cache.save_compile_cache() is None


def test_text_padding_reads_nothing_back_from_the_device(monkeypatch):
    """Padding a text batch and its SDPA mask come from the lengths (host), not from tensors read back per step."""
    text = TextFeatures(torch.randn(9, 4), [4, 5])
    rows, mask = text.padded()
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]
    assert torch.equal(rows[0, :4], text.features[:4]) and torch.equal(rows[1], text.features[4:])
    assert not rows[0, 4].any()
    same = TextFeatures(torch.randn(6, 4), [3, 3])
    same_mask = same.padded()[1]  # first use of these lengths: the index is built once, on the host
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("nonzero per step"))
    monkeypatch.setattr(torch.Tensor, "all", lambda *a, **k: pytest.fail("mask read back"))
    again, mask2 = text.padded()
    assert torch.equal(again, rows) and mask2 is mask
    assert key_padding_mask(mask, text.lens).shape == (2, 1, 1, 5)
    assert key_padding_mask(same.padded()[1], same.lens) is None and same.padded()[1] is same_mask


def test_attention_backend_context_restores_the_kernel_switches():
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.cudnn_sdp_enabled,
             torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before = [f() for f in flags]
    with attention_backend("cudnn", "cpu"):  # the CPU keeps PyTorch's choice
        assert [f() for f in flags] == before
    with attention_backend("cudnn", "cuda"):  # preferred first; flash, efficient and math stay usable
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert [f() for f in flags] == before


def test_cli_speed_flags():
    base = ["edit", "--image", "i.png", "--prompt", "p", "--edit-prompt", "q", "--whole-image", "--out", "o"]
    args = build_parser().parse_args(base)
    s = _settings(args)
    assert s.checkpointing == "auto" and s.low_memory is False
    s = _settings(build_parser().parse_args([*base, "--checkpointing", "6", "--low-memory"]))
    assert s.checkpointing == 6 and s.low_memory is True
    assert _settings(build_parser().parse_args([*base, "--checkpointing", "none"])).checkpointing == "none"
    assert s.compile == "auto" and _settings(build_parser().parse_args([*base, "--compile", "off"])).compile == "off"


def test_run_edit_low_memory_records_its_settings(tmp_path):
    ex = example_dir()
    spec = json.loads((ex / "case.json").read_text())
    settings = EditSettings(prompt_iters=1, lora_iters=1, low_memory=True)
    out = run_edit(tmp_path / "out", image=str(ex / spec["image"]), prompt=spec["prompt"],
                   edit_prompt=spec["edit_prompt"], mode="whole", preset="tiny", device="cpu", settings=settings,
                   progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["low_memory"] is True and summary["models"]["frozen_dtype"] == "float32"
    for stage in ("prompt", "lora"):
        record = json.loads((out / "stages" / stage / "stage.json").read_text())
        assert record["checkpoint_blocks"] == 2  # the tiny preset's depth: every block
