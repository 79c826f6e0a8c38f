"""The toy model's auxiliary attention loss: right tokens, right regions, the automatic mask's map, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editinfinity import toyworld as tw
from editinfinity.edit.mask import cell_fractions_from_pixels
from editinfinity.models import schedules
from editinfinity.models.bundle import bundled_tokenizer_dir
from editinfinity.models.infinity import AttentionMapCollector, Infinity
from editinfinity.models.quantizer import bitwise_self_correction
from editinfinity.models.text import STYLE_SUFFIX, target_token_range
from editinfinity.train import common
from editinfinity.train.attention_loss import (
    caption_word_spans,
    object_coverage,
    word_token_weights,
)
from editinfinity.train.transformer import (
    TransformerConfig,
    attention_targets,
    build_text_encoder,
    encode_captions,
    train_transformer,
)
from editinfinity.train.vae import VAEConfig, build_vae

GRIDS_64 = [[1, 1], [2, 2], [4, 4]]  # 64 px pictures, 16 px cells
TINY = {"model": {"depth": 2, "embed_dim": 64, "num_heads": 2}, "resolution": GRIDS_64, "image_size": 64,
        "batch_size": 4, "workers": 0, "log_seconds": 0, "checkpoint_minutes": 1000, "sample_images": 0,
        "minutes": 0, "warmup_steps": 1, "rows": 3, "replay_size": 8, "replay_refresh": 2, "cond_drop_rate": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()), legacy=True)


def _scenes(n: int, size: int = 64, two: bool | None = None) -> list[tw.Scene]:
    rng = np.random.default_rng(5)
    out = []
    while len(out) < n:
        s = tw.sample_scene(rng, size, size)
        if two is None or (len(s.shapes) == 2) == two:
            out.append(s)
    return out


def test_words_map_to_the_tokens_target_token_range_finds_in_the_prompt():
    tok = _tokenizer()
    scenes = _scenes(3, two=True) + _scenes(2, two=False)
    weights, objects, valid = word_token_weights(tok, scenes, rows=40)
    for b, scene in enumerate(scenes):
        caption = tw.caption(scene)
        spans = caption_word_spans(scene)
        assert valid[b].tolist() == [True] * len(spans) + [False] * (4 - len(spans))
        for w, (obj, c0, c1) in enumerate(spans):
            word = caption[c0:c1]
            attr = scene.shapes[obj].colour if w % 2 == 0 else scene.shapes[obj].kind
            assert word == attr and objects[b, w] == obj
            nth = caption.split().count(word) and [m for m, x in enumerate(spans) if caption[x[1]:x[2]] == word]
            occurrence = nth.index(w) + 1 if len(nth) > 1 else None
            target = word if occurrence is None else f"{word}#{occurrence}"
            start, end = target_token_range(tok, caption + STYLE_SUFFIX, target)
            rows = weights[b, :, w].nonzero().squeeze(1).tolist()
            assert rows == list(range(start, end))
            assert torch.allclose(weights[b, rows, w].sum(), torch.tensor(1.0))
        assert not weights[b, :, len(spans):].any()


def test_object_targets_are_the_visible_pixels_of_each_object_per_cell():
    scenes = _scenes(6, size=64)
    # 16 samples per 16 px cell are exactly the pixel centres: the same fractions as the user-mask path's
    cov = object_coverage(scenes, (4, 4), sub=16)
    for b, scene in enumerate(scenes):
        for i in range(2):
            if i < len(scene.shapes):
                want = cell_fractions_from_pixels(tw.render_mask(scene, i), (4, 4)).float()
                assert torch.allclose(cov[b, i], want, atol=1e-6)
            else:
                assert not cov[b, i].any()


def test_the_batched_maps_are_the_automatic_masks_map_and_the_loss_is_differentiable():
    tok = _tokenizer()
    cfg = common.load_config(TransformerConfig, overrides=TINY)
    torch.manual_seed(0)
    model = Infinity(**cfg.model).eval()
    enc = build_text_encoder(cfg, len(tok)).eval()
    scenes = _scenes(3, two=True)
    schedule = cfg.schedule()
    text = encode_captions(tok, enc, [tw.caption(s) for s in scenes], torch.device("cpu"))
    z = torch.randn(len(scenes), cfg.model["codebook_dim"], 4, 4)
    _, x_in = bitwise_self_correction(z, schedule, len(schedule), 0.0, torch.Generator().manual_seed(0))
    probe = attention_targets(tok, scenes, schedule, max(text.lens), "cpu")
    model(text, x_in, schedule, attention_probe=probe)
    # sample 0's colour word of object 1, as the automatic mask's collector measures it on sample 0
    word = 2
    rows = probe.weights[0, :, word].nonzero().squeeze(1)
    collector = AttentionMapCollector((int(rows[0]), int(rows[-1]) + 1), schedule)
    with torch.no_grad():
        model(text, x_in, schedule, attention_probe=collector)
    assert torch.allclose(probe.maps()[0, word].view(4, 4), collector.result(), atol=1e-5)
    # the loss reaches the cross-attention queries and keys (and not through the maps of absent words)
    loss = probe.loss()
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert model.blocks[0].ca.mat_q.weight.grad.abs().sum() > 0
    assert model.blocks[1].ca.mat_kv.weight.grad.abs().sum() > 0


def test_the_loss_is_zero_on_the_target_and_skips_dropped_samples():
    tok = _tokenizer()
    scenes = _scenes(2, two=True) + _scenes(1, two=False)
    schedule = schedules.normalize_schedule(GRIDS_64)
    probe = attention_targets(tok, scenes, schedule, 30, "cpu")
    probe._sum, probe._count = probe.target.clone() * 3.0, 1  # any positive multiple of the coverage
    assert probe.loss().item() == pytest.approx(0.0, abs=1e-6)
    probe._sum = torch.ones_like(probe.target)  # uniform maps
    uniform = probe.loss().item()
    assert uniform > 0.1

    class Cond:
        dropped = [False, True, True]

    probe.on_condition(Cond())
    probe._sum = torch.ones_like(probe.target)
    probe._sum[1:] = probe.target[1:]  # dropped samples' maps do not count
    only_first = probe.loss().item()
    probe._sum[1:] = 1.0
    assert probe.loss().item() == pytest.approx(only_first)
    assert probe.keep[2].tolist() == [False] * 4 and probe.keep[0].tolist() == [True] * 4


def test_training_with_the_attention_loss_runs_and_logs_it(tmp_path):
    vae_cfg = common.load_config(VAEConfig, overrides={
        "model": {"base_ch": 24, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1}, "resolution": GRIDS_64,
        "image_size": 64, "batch_size": 2, "workers": 0})
    build_vae(vae_cfg).save_pretrained(tmp_path / "vae")
    cfg = common.load_config(TransformerConfig, overrides={**TINY, "steps": 6, "lr": 3e-3,
                                                            "attn_loss_weight": 1.0, "cond_drop_rate": 0.5})
    res = train_transformer(cfg, tmp_path / "run", tmp_path / "vae", device="cpu")
    attn = [h["attn_loss"] for h in res.history]
    assert len(attn) == 6 and np.isfinite(attn).all() and max(attn) > 0  # 0 where every sample was dropped
    with pytest.raises(common.InvalidCaseError, match="attn_loss_weight must be >= 0"):
        common.load_config(TransformerConfig, overrides={**TINY, "attn_loss_weight": -1.0})


def test_the_true_edit_cells_follow_the_methods_own_pixel_to_cell_rule():
    """The evaluation's mask IoU compares against the cells a user mask of the exact region selects (>= 20 %
    covered), not every cell a single pixel touches."""
    from editinfinity.evaluation.toy_judge import true_cells

    mask = np.zeros((64, 64), dtype=bool)
    mask[0:16, 0:16] = True  # one full cell
    mask[0:16, 16:19] = True  # 3 of 16 columns of the next cell: 18.75 %, below the rule
    mask[16:20, 0:16] = True  # 4 of 16 rows of the cell below: 25 %, selected
    cells = true_cells(mask, (4, 4))
    assert cells.tolist()[0][:2] == [True, False] and cells[1, 0] and cells.sum() == 2
