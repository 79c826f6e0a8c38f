"""Infinity transformer: properties that hold for any weights (tiny random models, CPU, float32).

Random models use ``init_weights(aln_init=1, aln_gamma_init=1, head_scale=1)`` so every block changes the output
(the training-recipe init makes blocks almost silent). Schedules are template prefixes from ``schedules``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from editinfinity.errors import CheckpointError
from editinfinity.models import schedules
from editinfinity.models.checkpoints.infinity import chunk_count
from editinfinity.models.infinity import (
    AttentionMapCollector,
    Infinity,
    bit_loss,
    chunked_block_key,
    flat_block_key,
    flatten_block_keys,
    load_infinity_state_dict,
    sample_bits,
    summed_bit_ce,
    to_official_state_dict,
)
from editinfinity.models.quantizer import inputs_from_bits, scale_codes_on_grid
from editinfinity.models.text import TextFeatures

D_BITS = 8
CT5 = 128
SQUARE = schedules.get_schedule(1.0, "0.06M")[:4]  # 1, 2x2, 4x4, 6x6 -> L = 57
WIDE = schedules.get_schedule(0.75, "0.06M")[:5]  # 1, 2x2, 3x4, 6x8, 9x12


def make_model(seed: int = 0, **overrides) -> Infinity:
    kwargs = dict(depth=2, embed_dim=64, num_heads=2, text_channels=CT5, codebook_dim=D_BITS, block_chunks=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = Infinity(**kwargs)
    model.init_weights(aln_init=1.0, aln_gamma_init=1.0, head_scale=1.0)
    return model.eval()


def make_text(lens: list[int], seed: int = 1) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    return TextFeatures(0.5 * torch.randn(sum(lens), CT5, generator=g), lens)


def random_bits(schedule, batch: int = 1, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2, (batch, h, w, D_BITS), generator=g, dtype=torch.uint8) for _, h, w in schedule]


@pytest.fixture(scope="module")
def model() -> Infinity:
    return make_model()


# -- configuration ----------------------------------------------------------------------------------------------


def test_official_shapes_on_meta_device():
    """2B: the spec's key shapes and parameter count; FFN widths use Python's half-to-even round."""
    with torch.device("meta"):
        big = Infinity(depth=32, embed_dim=2048, num_heads=16, block_chunks=8)
        layer32 = Infinity(depth=1, embed_dim=2080, num_heads=20)
        layer48 = Infinity(depth=1, embed_dim=3360, num_heads=28)
    assert sum(p.numel() for p in big.parameters()) == 2_204_564_032
    official = to_official_state_dict(big)
    assert official["text_proj_for_sos.ca.mat_q"].shape == (1, 16, 128)
    assert official["shared_ada_lin.1.weight"].shape == (12288, 2048)
    assert official["block_chunks.7.module.3.sa.scale_mul_1H11"].shape == (1, 16, 1, 1)
    assert official["block_chunks.0.module.0.ada_gss"].shape == (1, 1, 6, 2048)
    assert official["lvl_embed.weight"].shape == (15, 2048)
    assert official["cfg_uncond"].shape == (512, 2048)
    assert layer32.blocks[0].ffn.fc1.out_features == 8192  # 32.5 rounds to 32
    assert layer48.blocks[0].ffn.fc1.out_features == 13312  # 52.5 rounds to 52


def test_invalid_configurations():
    with pytest.raises(ValueError, match="bias_mode"):
        Infinity(depth=1, embed_dim=64, num_heads=2, text_channels=CT5, bias_mode="nope")
    with pytest.raises(ValueError, match="block_chunks"):
        Infinity(depth=3, embed_dim=64, num_heads=2, text_channels=CT5, block_chunks=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        Infinity(depth=1, embed_dim=60, num_heads=10, text_channels=CT5)
    with pytest.raises(ValueError, match="multiple of 128"):
        Infinity(depth=1, embed_dim=64, num_heads=2, text_channels=100)


def test_unconditional_rows_are_deterministic():
    a, b = make_model(seed=0), make_model(seed=123)
    assert torch.equal(a.cfg_uncond, b.cfg_uncond)
    assert a.cfg_uncond.abs().max() <= 2.0 / math.sqrt(CT5)  # truncated at +-2 before the 1/sqrt(Ct5) scaling
    assert not torch.equal(a.blocks[0].sa.mat_qkv.weight, b.blocks[0].sa.mat_qkv.weight)


# -- teacher forcing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [SQUARE, WIDE], ids=["square", "wide"])
def test_block_causal(model, schedule):
    """Changing the inputs of scale k changes the logits of scales >= k only."""
    text = make_text([5])
    x = inputs_from_bits(random_bits(schedule), schedule)
    offsets = schedules.scale_offsets(schedule)
    with torch.no_grad():
        base = model(text, x, schedule)
        for k in range(1, len(schedule)):
            x2 = x.clone()
            x2[:, offsets[k] - 1:offsets[k + 1] - 1] += 0.3  # x_wo_prefix has no start token
            out = model(text, x2, schedule)
            assert torch.equal(out[:, :offsets[k]], base[:, :offsets[k]]), k
            assert not torch.allclose(out[:, offsets[k]:offsets[k + 1]], base[:, offsets[k]:offsets[k + 1]]), k


def test_padded_batch_equals_single_samples(model):
    """Texts of different lengths in one batch (padding + masks) give each sample's own logits."""
    text = make_text([3, 7, 5])
    x = inputs_from_bits(random_bits(SQUARE, batch=3), SQUARE)
    with torch.no_grad():
        batched = model(text, x, SQUARE)
        for i in range(3):
            single = model(text.select(i), x[i:i + 1], SQUARE)
            torch.testing.assert_close(batched[i:i + 1], single, atol=2e-5, rtol=1e-5)


def test_input_validation(model):
    text = make_text([4])
    with pytest.raises(ValueError, match="x_wo_prefix"):
        model(text, torch.zeros(1, 3, D_BITS), SQUARE)
    with pytest.raises(ValueError, match="level embeddings"):
        model(text, torch.zeros(1, 1, D_BITS), [(1, 1, 1)] * 16)


def test_bias_mode_switch():
    m = make_model()
    with torch.no_grad():
        for blk in m.blocks:
            blk.sa.q_bias.normal_(0, 0.5)
            blk.sa.v_bias.normal_(0, 0.5)
            blk.ca.v_bias.normal_(0, 0.5)
        m.text_proj_for_sos.ca.v_bias.normal_(0, 0.5)
    text, x = make_text([4]), inputs_from_bits(random_bits(SQUARE), SQUARE)
    ref = make_model()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        ref.set_bias_mode("editinfinity")
        for blk in ref.blocks:  # editinfinity semantics == zero biases
            blk.sa.q_bias.zero_(), blk.sa.v_bias.zero_(), blk.ca.v_bias.zero_()
        ref.text_proj_for_sos.ca.v_bias.zero_()
        upstream = m(text, x, SQUARE)
        m.set_bias_mode("editinfinity")
        ignored = m(text, x, SQUARE)
    assert m.config.bias_mode == "editinfinity"
    assert not torch.allclose(upstream, ignored)
    assert torch.equal(ignored, ref(text, x, SQUARE))
    with pytest.raises(ValueError):
        m.set_bias_mode("both")


def test_condition_dropout_and_drop_path_need_train_mode():
    m = make_model(cond_drop_rate=1.0, drop_path_rate=0.5)
    text, x = make_text([4, 6]), inputs_from_bits(random_bits(SQUARE, batch=2), SQUARE)
    with torch.no_grad():
        eval_out = m(text, x, SQUARE)
        assert torch.equal(eval_out, m(text, x, SQUARE, generator=torch.Generator().manual_seed(0)))
        m.set_regularization(drop_path_rate=0.0)
        m.train()
        dropped = m(text, x, SQUARE, generator=torch.Generator().manual_seed(0))
        m.eval()
        uncond = m(m.unconditional_text(text.lens), x, SQUARE)
        torch.testing.assert_close(dropped, uncond)  # rate 1: every sample's text became cfg_uncond[:len]
        m.set_regularization(cond_drop_rate=0.0, drop_path_rate=0.5)
        m.train()
        a = m(text, x, SQUARE, generator=torch.Generator().manual_seed(3))
        b = m(text, x, SQUARE, generator=torch.Generator().manual_seed(3))
        c = m(text, x, SQUARE, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, eval_out)


def test_gradient_checkpointing_same_gradients():
    m = make_model().train()
    text, x = make_text([4]), inputs_from_bits(random_bits(SQUARE), SQUARE)
    gt = torch.cat([b.reshape(1, -1, D_BITS) for b in random_bits(SQUARE, seed=9)], dim=1)

    def grads():
        m.zero_grad()
        m.bit_loss(m(text, x, SQUARE), gt, SQUARE).backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    plain = grads()
    m.enable_gradient_checkpointing()
    ckpt = grads()
    m.disable_gradient_checkpointing()
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


# -- losses -----------------------------------------------------------------------------------------------------


def test_losses_on_uniform_logits():
    L = schedules.num_tokens(SQUARE)
    logits = torch.zeros(2, L, 2 * D_BITS)
    gt = torch.randint(0, 2, (2, L, D_BITS), dtype=torch.uint8)
    reweighted = bit_loss(logits, gt, SQUARE)
    assert reweighted.dtype == torch.float64
    assert math.isclose(reweighted.item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(bit_loss(logits, gt, SQUARE, reweight=False).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(summed_bit_ce(logits, gt).item(), L * D_BITS * math.log(2), rel_tol=1e-5)


def test_losses_match_direct_formulas():
    L = schedules.num_tokens(WIDE)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, L, 2 * D_BITS, generator=g)
    gt = torch.randint(0, 2, (2, L, D_BITS), generator=g, dtype=torch.uint8)
    ce = F.cross_entropy(logits.view(-1, 2), gt.reshape(-1).long(), reduction="none").view(2, L, D_BITS)
    weights = schedules.loss_weights(WIDE)
    expected = (ce.mean(-1).double() * weights).sum(-1).mean()
    torch.testing.assert_close(bit_loss(logits, gt, WIDE), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(bit_loss(logits, gt, WIDE, reweight=False), ce.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(summed_bit_ce(logits, gt), ce.sum() / 2, rtol=1e-5, atol=0)
    with pytest.raises(ValueError):
        bit_loss(logits, gt[:, :-1], WIDE)


# -- sampling ---------------------------------------------------------------------------------------------------


def test_sampler_top_k_top_p():
    logits = torch.tensor([[[0.0, 0.1], [2.0, -1.0], [0.0, 5.0], [1.0, 1.0]]]).repeat(1, 2000, 1)
    greedy = sample_bits(logits, top_k=1, generator=torch.Generator().manual_seed(0)).view(2000, 4)
    assert (greedy[:, 0] == 1).all() and (greedy[:, 1] == 0).all() and (greedy[:, 2] == 1).all()
    assert 0 < greedy[:, 3].sum() < 2000  # an exact tie keeps both classes
    # top_p 0.97: drops the minority only when its probability <= 0.03 (sigmoid(-5) = 0.0067; sigmoid(-0.1) = 0.475)
    nucleus = sample_bits(logits, top_p=0.97, generator=torch.Generator().manual_seed(0)).view(2000, 4)
    assert (nucleus[:, 2] == 1).all()
    assert 0 < nucleus[:, 0].sum() < 2000 and 0 < nucleus[:, 1].sum() < 2000
    # no truncation: the rare class does appear
    free = sample_bits(logits, generator=torch.Generator().manual_seed(0)).view(2000, 4)
    assert (free[:, 2] == 0).any()
    again = sample_bits(logits, top_p=0.97, generator=torch.Generator().manual_seed(0)).view(2000, 4)
    assert torch.equal(nucleus, again)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_generation_equals_teacher_forcing(model, cfg):
    """KV-cached sampling logits == teacher-forced logits on the sampled inputs (guided: on the doubled batch)."""
    text = make_text([4, 6])
    tau = 0.7
    out = model.generate(text, WIDE, cfg=cfg, tau=tau, top_k=0, top_p=0.0,
                         generator=torch.Generator().manual_seed(0), keep_logits=True)
    x = inputs_from_bits(out.bits, WIDE)
    with torch.no_grad():
        if cfg == 1.0:
            expected = model(text, x, WIDE) / tau
        else:
            both = model(text.cat(model.unconditional_text(text.lens)), torch.cat([x, x]), WIDE) / tau
            expected = cfg * both[:2] + (1 - cfg) * both[2:]
    cached = torch.cat([lg.flatten(2) for lg in out.logits], dim=1)
    torch.testing.assert_close(cached, expected, atol=5e-5, rtol=1e-5)
    summed = torch.stack(scale_codes_on_grid(out.bits, WIDE)).sum(0)
    torch.testing.assert_close(out.summed_codes, summed)


def test_generation_reproducible_and_hook(model):
    text = make_text([5])
    a = model.generate(text, SQUARE, generator=torch.Generator().manual_seed(7))
    b = model.generate(text, SQUARE, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits, strict=True))
    # replace mode: every scale's codes swapped for given source codes -> the model reads the source inputs
    source = random_bits(SQUARE, seed=11)
    source_codes = scale_codes_on_grid(source, SQUARE)
    seen = []

    def replace(k, codes_up):
        seen.append(k)
        assert codes_up.shape == source_codes[k].shape
        return source_codes[k]

    out = model.generate(text, SQUARE, cfg=1.0, tau=1.0, generator=torch.Generator().manual_seed(0),
                         on_scale=replace, keep_logits=True)
    assert seen == list(range(len(SQUARE)))
    torch.testing.assert_close(out.summed_codes, torch.stack(source_codes).sum(0))
    with torch.no_grad():
        expected = model(text, inputs_from_bits(source, SQUARE), SQUARE)
    torch.testing.assert_close(torch.cat([lg.flatten(2) for lg in out.logits], dim=1), expected, atol=5e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="on_scale"):
        model.generate(text, SQUARE, on_scale=lambda k, c: c[:, :1])


def test_generation_rejects_long_text(model):
    with pytest.raises(ValueError, match="unconditional rows"):
        model.generate(make_text([model.config.text_maxlen + 1]), SQUARE)


# -- attention maps ---------------------------------------------------------------------------------------------


def test_attention_collector(model):
    text = make_text([6, 9])
    x = inputs_from_bits(random_bits(WIDE, batch=2), WIDE)
    everything = AttentionMapCollector((0, 6), WIDE)
    with torch.no_grad():
        model(text, x, WIDE, attention_probe=everything)
    assert everything.count == len(model.blocks) * len(WIDE)
    # softmax rows sum to 1, so the mean over all of sample 0's 6 columns is 1/6 everywhere
    torch.testing.assert_close(everything.result(), torch.full(schedules.last_grid(WIDE), 1 / 6))
    word, alone = AttentionMapCollector((1, 3), WIDE), AttentionMapCollector((1, 3), WIDE)
    with torch.no_grad():
        model(text, x, WIDE, attention_probe=word)
        model(text.select(0), x[:1], WIDE, attention_probe=alone)
    torch.testing.assert_close(word.result(), alone.result())  # only the conditional sample 0 counts
    assert not torch.allclose(word.result(), everything.result())
    with pytest.raises(ValueError, match="text rows"), torch.no_grad():
        model(text, x, WIDE, attention_probe=AttentionMapCollector((4, 8), WIDE))
    with pytest.raises(RuntimeError):
        AttentionMapCollector((0, 1), WIDE).result()


# -- persistence and checkpoints --------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    m = make_model(bias_mode="editinfinity")
    m.save_pretrained(tmp_path)
    loaded = Infinity.from_pretrained(tmp_path).eval()
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in m.config.items() if not k.startswith("_")}
    assert loaded.blocks[0].sa.bias_mode == "editinfinity"
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text, x = make_text([3]), inputs_from_bits(random_bits(SQUARE), SQUARE)
    with torch.no_grad():
        assert torch.equal(m(text, x, SQUARE), loaded(text, x, SQUARE))


@pytest.mark.parametrize("chunks", [1, 2])
def test_chunked_and_flat_keys_round_trip(chunks):
    m = make_model()
    official = to_official_state_dict(m, block_chunks=chunks)
    prefix = "block_chunks." if chunks > 1 else "blocks."
    assert any(k.startswith(prefix) for k in official)
    assert not any(k.startswith("block_chunks." if chunks == 1 else "blocks.") for k in official)
    fresh = make_model(seed=5)
    report = load_infinity_state_dict(fresh, official)
    assert report.block_chunks == chunks
    a, b = m.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    flat, found = flatten_block_keys(official, depth=2, block_chunks=2)
    assert found == chunks and set(flat) == set(a)


def test_block_key_helpers():
    assert flat_block_key("block_chunks.3.module.1.ffn.fc1.lora_A", 4) == "blocks.13.ffn.fc1.lora_A"
    assert chunked_block_key("blocks.13.ffn.fc1.lora_A", 4) == "block_chunks.3.module.1.ffn.fc1.lora_A"
    assert flat_block_key("head.weight", 4) == "head.weight"
    with pytest.raises(CheckpointError):
        flat_block_key("block_chunks.0.module.4.sa.proj.weight", 4)


@pytest.mark.parametrize("depth,chunks,present", [(3, 3, (0, 1)), (4, 4, (0, 1)), (6, 3, (1,))])
def test_reference_lora_chunk_count_comes_from_the_model_config(depth, chunks, present):
    """A partial LoRA dict in the reference's chunked layout maps onto the blocks the model configuration says;
    inferring the chunk count from the keys present (highest index + 1) misplaces or refuses these dicts."""
    from editinfinity.models.checkpoints import reference_lora_to_peft

    model = make_model(depth=depth, block_chunks=chunks)
    per_chunk, rank, width = depth // chunks, 2, model.config.embed_dim
    blocks = [c * per_chunk + j for c in present for j in range(per_chunk)]
    ref = {chunked_block_key(f"blocks.{i}.ffn.fc1.lora_A", per_chunk): torch.full((rank * width,), float(i))
           for i in blocks}
    assert chunk_count(ref) != chunks  # the keys alone would give another count
    out = reference_lora_to_peft(ref, rank, model.config.depth, model.config.block_chunks)
    assert sorted(out) == sorted(f"blocks.{i}.ffn.fc1.lora_A.weight" for i in blocks)
    modules = dict(model.named_modules())
    for i in blocks:
        assert f"blocks.{i}.ffn.fc1" in modules
        assert out[f"blocks.{i}.ffn.fc1.lora_A.weight"].shape == (rank, width)
        assert torch.all(out[f"blocks.{i}.ffn.fc1.lora_A.weight"] == i)
    beyond = {f"block_chunks.{chunks}.module.0.ffn.fc1.lora_A": torch.zeros(rank * width)}
    with pytest.raises(CheckpointError, match=f"{chunks} block chunks"):
        reference_lora_to_peft(beyond, rank, model.config.depth, model.config.block_chunks)


def test_checkpoint_rules():
    m = make_model()
    sd = to_official_state_dict(m, block_chunks=2)
    fresh = make_model(seed=1)
    # legacy buffers are dropped; absent zero_k_bias buffers are filled
    extra = dict(sd, attn_bias_for_masking=torch.zeros(3), lvl_1L=torch.zeros(1, 4))
    for key in [k for k in extra if k.endswith("zero_k_bias")][:2]:
        del extra[key]
    report = load_infinity_state_dict(fresh, extra)
    assert sorted(report.dropped) == ["attn_bias_for_masking", "lvl_1L"] and len(report.zero_buffers_filled) == 2
    # cfg_uncond: a shorter table keeps its rows and takes the rest from the model's own deterministic rows
    short = dict(sd, cfg_uncond=torch.ones(10, CT5))
    load_infinity_state_dict(fresh, short)
    assert torch.equal(fresh.cfg_uncond[:10], torch.ones(10, CT5))
    assert torch.equal(fresh.cfg_uncond[10:], make_model(seed=9).cfg_uncond[10:])
    longer = dict(sd, cfg_uncond=torch.arange(600 * CT5, dtype=torch.float32).view(600, CT5))
    load_infinity_state_dict(fresh, longer)
    assert torch.equal(fresh.cfg_uncond, longer["cfg_uncond"][:512])


def test_checkpoint_errors_list_every_problem():
    m = make_model()
    sd = to_official_state_dict(m, block_chunks=2)
    bad = dict(sd)
    del bad["head.bias"]
    bad["not.a.key"] = torch.zeros(1)
    bad["block_chunks.1.module.0.ffn.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_infinity_state_dict(make_model(), bad)
    msg = str(err.value)
    assert "head.bias" in msg and "not.a.key" in msg and "block_chunks.1.module.0.ffn.fc1.weight" in msg
    with pytest.raises(CheckpointError, match="zeros"):
        load_infinity_state_dict(make_model(), dict(sd, **{"block_chunks.0.module.0.sa.zero_k_bias": torch.ones(64)}))
    with pytest.raises(CheckpointError, match="zeros"):
        load_infinity_state_dict(make_model(), dict(sd, **{"text_proj_for_sos.ca.zero_k_bias": torch.ones(64)}))
    three = to_official_state_dict(make_model(depth=3, block_chunks=3), block_chunks=3)
    with pytest.raises(CheckpointError, match="chunks"):
        load_infinity_state_dict(make_model(), three)


# -- GPU --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_bf16_autocast_and_cpu_generator():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = make_model()
    gpu = make_model().cuda()
    text, x = make_text([4, 7]), inputs_from_bits(random_bits(SQUARE, batch=2), SQUARE)
    with torch.no_grad():
        ref = cpu(text, x, SQUARE)
        fp32 = gpu(text.to("cuda"), x.cuda(), SQUARE).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu(text.to("cuda"), x.cuda(), SQUARE)
    assert bf16.dtype == torch.float32  # the head runs in float32
    torch.testing.assert_close(fp32, ref, atol=2e-3, rtol=1e-3)
    rel = (bf16.cpu() - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    # a CPU generator gives the same draws on GPU (sampling moves to the generator's device)
    a = cpu.generate(text, SQUARE, generator=torch.Generator().manual_seed(0), top_p=0.0, keep_logits=True)
    b = gpu.generate(text, SQUARE, generator=torch.Generator().manual_seed(0), top_p=0.0, keep_logits=True)
    torch.testing.assert_close(b.logits[0].cpu(), a.logits[0], atol=2e-3, rtol=1e-3)
    assert torch.equal(b.bits[0].cpu(), a.bits[0])
