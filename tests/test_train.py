"""Training code: batched renderer and seeds, the VAE and transformer loops (learning, exact resumption), the toy
driver's weights directory, and the evaluation script. Everything runs on the CPU with tiny models at 64 px."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from editinfinity import toyworld as tw
from editinfinity.edit.images import image_to_tensor
from editinfinity.evaluation.toy_judge import keep_region
from editinfinity.models.bsq_vae import BSQVAE
from editinfinity.models.bundle import bundled_tokenizer_dir, load_models
from editinfinity.models.quantizer import multiscale_quantize
from editinfinity.models.text import STYLE_SUFFIX, TextFeatures, encode_prompts
from editinfinity.train import common
from editinfinity.train.cli import add_train_parser
from editinfinity.train.data import SceneStream, render_batch, scene_batch, stream_rng
from editinfinity.train.transformer import (
    TransformerConfig,
    append_rows,
    build_text_encoder,
    build_transformer,
    encode_captions,
    load_initial_weights,
    text_variants,
    train_transformer,
)
from editinfinity.train.vae import VAEConfig, build_vae, train_vae, vae_losses

ROOT = Path(__file__).resolve().parents[1]
GRIDS_64 = [[1, 1], [2, 2], [4, 4]]  # a 3-scale schedule for 64 px pictures
TINY_VAE = {"model": {"base_ch": 24, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1}, "resolution": GRIDS_64,
            "image_size": 64, "batch_size": 2, "workers": 0, "log_seconds": 0, "checkpoint_minutes": 1000,
            "eval_images": 2, "minutes": 0, "warmup_steps": 2}
TINY_TRANSFORMER = {"model": {"depth": 1, "embed_dim": 64, "num_heads": 2}, "resolution": GRIDS_64, "image_size": 64,
                    "batch_size": 2, "workers": 0, "log_seconds": 0, "checkpoint_minutes": 1000, "sample_images": 0,
                    "minutes": 0, "warmup_steps": 2, "rows": 3, "replay_size": 8, "replay_refresh": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae_config(**kw) -> VAEConfig:
    return common.load_config(VAEConfig, overrides={**TINY_VAE, **kw})


def tiny_transformer_config(**kw) -> TransformerConfig:
    return common.load_config(TransformerConfig, overrides={**TINY_TRANSFORMER, **kw})


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny random VAE in the save_pretrained layout (the transformer tests only need its codes)."""
    d = tmp_path_factory.mktemp("vae") / "vae"
    build_vae(tiny_vae_config()).save_pretrained(d)
    return d


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()), legacy=True)


# ------------------------------------------------------------------------------------------------- data


def test_render_batch_equals_toyworld_render_and_adds_the_requested_noise():
    scenes = scene_batch(0, 1, 0, 12)
    ref = torch.cat([image_to_tensor(tw.render(s)) for s in scenes])
    assert torch.equal(render_batch(scenes), ref)
    gen = torch.Generator().manual_seed(0)
    noisy = render_batch(scenes[:3], noise=torch.tensor([0.0, 2.0, 4.0]), generator=gen)
    std = ((noisy - ref[:3]) * 127.5).std(dim=(1, 2, 3))
    assert std[0] == 0 and abs(float(std[1]) - 2) < 0.2 and abs(float(std[2]) - 4) < 0.3


def test_training_streams_are_seeded_per_step_and_never_evaluation_seeds():
    assert scene_batch(3, 2, 7, 4) == scene_batch(3, 2, 7, 4)
    assert scene_batch(3, 2, 7, 4) != scene_batch(3, 2, 8, 4)
    assert scene_batch(3, 1, 7, 4) != scene_batch(3, 2, 7, 4)
    # numpy pads seed entropy with zeros: stream 0 of seed s at step 0 would replay tw.sample_scene(...) seeds
    with pytest.raises(ValueError, match="numbered from 1"):
        stream_rng(0, 0, 0)
    first = {float(stream_rng(0, s, step).random()) for s in (1, 2, 3) for step in range(50)}
    evaluation = {float(np.random.default_rng(i).random()) for i in range(1000)}
    assert not first & evaluation


def test_scene_stream_with_worker_processes_gives_the_in_process_batches():
    with SceneStream(5, 1, 3, start=4, workers=2, width=64, height=64) as pooled:
        got = [pooled.get(step) for step in range(4, 8)]
    assert got == [scene_batch(5, 1, step, 3, 64, 64) for step in range(4, 8)]
    with SceneStream(5, 1, 3, start=4) as stream, pytest.raises(ValueError, match="expected step 4"):
        stream.get(5)


# ------------------------------------------------------------------------------------------------- VAE


def test_vae_objective_reaches_the_encoder_through_the_quantiser_and_learns():
    cfg = tiny_vae_config()
    vae = build_vae(cfg)
    img = render_batch(scene_batch(0, 1, 0, 4, 64, 64))
    losses = vae_losses(vae, img, cfg.schedule(), cfg)
    (losses["l1"] + losses["mse"]).backward()  # reconstruction only: the encoder's gradient must pass the quantiser
    assert vae.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    first = None
    for _ in range(25):
        loss = vae_losses(vae, img, cfg.schedule(), cfg)["loss"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.6 * first


def test_vae_resume_continues_exactly_where_the_checkpoint_stopped(tmp_path):
    cfg = tiny_vae_config(steps=4)
    straight = train_vae(cfg, tmp_path / "straight", device="cpu")
    assert straight.steps == 4 and (tmp_path / "straight" / "vae" / "config.json").is_file()
    assert straight.heldout["images"] == 2 and np.isfinite(straight.heldout["mean_psnr"])

    part = train_vae(cfg, tmp_path / "resumed", device="cpu", stop_at=2)
    assert part.steps == 2 and not (tmp_path / "resumed" / "vae").exists()
    ckpt = tmp_path / "resumed" / "checkpoint"
    payload = torch.load(ckpt / common.STATE_FILE, weights_only=True)
    assert payload["step"] == 2 and payload["total_steps"] == 4
    # the checkpoint's optimizer state loads into a fresh optimizer unchanged
    vae = build_vae(cfg)
    opt = common.adamw(common.decay_groups(list(vae.named_parameters())), cfg.lr, cfg.betas, cfg.weight_decay,
                       torch.device("cpu"))
    state = common.load_checkpoint(ckpt, {"model": vae}, opt, {})
    assert state.step == 2
    for k, saved in payload["optimizer"]["state"].items():
        for name, tensor in saved.items():
            assert torch.equal(opt.state_dict()["state"][k][name], tensor)
    with pytest.raises(common.CheckpointError, match="--resume"):
        train_vae(cfg, tmp_path / "resumed", device="cpu")

    resumed = train_vae(cfg, tmp_path / "resumed", device="cpu", resume=True)
    assert resumed.steps == 4
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    a = BSQVAE.from_pretrained(str(tmp_path / "straight" / "vae")).state_dict()
    b = BSQVAE.from_pretrained(str(tmp_path / "resumed" / "vae")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_can_be_extended_with_a_new_learning_rate_cycle(tmp_path):
    cfg = tiny_vae_config(steps=3, warmup_steps=2)
    train_vae(cfg, tmp_path / "run", device="cpu")
    first = (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = train_vae(cfg, tmp_path / "run", device="cpu", resume=True)  # finished: nothing more to do
    assert again.steps == 3
    more = train_vae(tiny_vae_config(steps=2, warmup_steps=2), tmp_path / "run", device="cpu", resume=True,
                     extend=True)
    assert more.steps == 5
    assert [h["step"] for h in more.history] == [1, 2, 3, 4, 5]
    assert [h["lr"] for h in more.history][3] == pytest.approx(cfg.lr / 2)  # warm-up restarts at step 4
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() != first


def test_decoder_only_fine_tuning_keeps_the_encoder_and_so_every_code(tmp_path):
    start = tmp_path / "start"
    train_vae(tiny_vae_config(steps=2), start, device="cpu")
    with pytest.raises(common.InvalidCaseError, match="init_from"):
        tiny_vae_config(train_encoder=False)
    cfg = tiny_vae_config(steps=3, init_from=str(start / "vae"), train_encoder=False, lr=1e-2)
    train_vae(cfg, tmp_path / "decoder", device="cpu")
    a = BSQVAE.from_pretrained(str(start / "vae"))
    b = BSQVAE.from_pretrained(str(tmp_path / "decoder" / "vae"))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("encoder."))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decoder."))
    img = render_batch(scene_batch(0, 1, 7, 3, 64, 64))
    sched = cfg.schedule()
    ca, cb = a.encode(img, sched), b.encode(img, sched)
    assert all(torch.equal(x, y) for x, y in zip(ca.bits, cb.bits, strict=True))


# ------------------------------------------------------------------------------------------------- transformer


def test_caption_features_equal_the_inference_encoding_and_rows_append_per_sample():
    tok = _tokenizer()
    cfg = tiny_transformer_config()
    t5 = build_text_encoder(cfg, len(tok)).eval()
    prompts = ["a red circle on a gray background", "a blue square and a green triangle on a white background"
               + STYLE_SUFFIX]
    with torch.no_grad():
        ours = encode_captions(tok, t5, prompts, torch.device("cpu"))
    ref = encode_prompts(tok, t5, prompts)
    assert ours.lens == ref.lens and torch.allclose(ours.features, ref.features, atol=1e-6)
    # the batched append equals TextFeatures.append_rows sample by sample, gradients included
    rows = torch.randn(2, 3, ref.channels, requires_grad=True)
    feats = ref.features.clone().requires_grad_(True)
    for chosen in ([False, True], [True, True], [True, False], [False, False]):
        text = append_rows(TextFeatures(feats, ref.lens), rows, chosen)
        expected = [TextFeatures(b, [len(b)]).append_rows(rows[i]) if c else TextFeatures(b, [len(b)])
                    for i, (b, c) in enumerate(zip(TextFeatures(feats, ref.lens).split(), chosen, strict=True))]
        assert text.lens == [e.lens[0] for e in expected]
        assert torch.equal(text.features, torch.cat([e.features for e in expected]))
    text.features.sum().backward()
    assert feats.grad is not None and torch.equal(feats.grad, torch.ones_like(feats))


def test_text_variants_mix_plain_and_styled_prompts_with_zero_or_tiny_rows():
    cfg = tiny_transformer_config(style_prob=0.5, rows_prob=0.5, rows=4)
    captions = [f"a red circle on a {c} background" for c in tw.COLOURS if c != "red"] * 8
    prompts, rows, chosen = text_variants(cfg, 3, captions, 128)
    again, rows2, chosen2 = text_variants(cfg, 3, captions, 128)
    assert prompts == again and chosen == chosen2 and torch.equal(rows, rows2)
    styled = [p.endswith(STYLE_SUFFIX) for p in prompts]
    assert 0 < sum(styled) < len(prompts)
    assert any(chosen) and all(s for s, w in zip(styled, chosen, strict=True) if w)  # rows only after styled prompts
    used = [r for r, w in zip(rows, chosen, strict=True) if w]
    assert rows.shape == (len(captions), 4, 128) and all(float(r.abs().max()) < 0.1 for r in used)
    assert any(float(r.abs().max()) == 0 for r in used) and any(float(r.abs().max()) > 0 for r in used)


def test_transformer_training_lowers_the_bit_loss(tmp_path, vae_dir):
    cfg = tiny_transformer_config(steps=14, lr=3e-3, warmup_steps=1, batch_size=4)
    res = train_transformer(cfg, tmp_path / "run", vae_dir, device="cpu")
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 14 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.01
    assert (tmp_path / "run" / "transformer" / "config.json").is_file()
    assert (tmp_path / "run" / "text_encoder" / "config.json").is_file()


@pytest.mark.parametrize("replay", [8, 0])
def test_transformer_resume_continues_exactly(tmp_path, vae_dir, replay):
    cfg = tiny_transformer_config(steps=4, replay_size=replay)
    train_transformer(cfg, tmp_path / "straight", vae_dir, device="cpu")
    part = train_transformer(cfg, tmp_path / "resumed", vae_dir, device="cpu", stop_at=2)
    assert part.steps == 2 and not (tmp_path / "resumed" / "transformer").exists()
    exported = []
    resumed = train_transformer(cfg, tmp_path / "resumed", vae_dir, device="cpu", resume=True,
                                on_save=lambda t, e, final: exported.append(final))
    assert resumed.steps == 4 and exported[-1] is True
    for name in ("transformer", "text_encoder"):
        a = (tmp_path / "straight" / "checkpoint" / f"{name}.safetensors").read_bytes()
        b = (tmp_path / "resumed" / "checkpoint" / f"{name}.safetensors").read_bytes()
        assert a == b, name


def test_initial_weights_are_copied_strictly(tmp_path):
    tok = _tokenizer()
    cfg = tiny_transformer_config()
    trained_t, trained_e = build_transformer(cfg), build_text_encoder(cfg, len(tok))
    with torch.no_grad():
        for prm in list(trained_t.parameters()) + list(trained_e.parameters()):
            prm.add_(0.01)
    trained_t.save_pretrained(tmp_path / "w" / "transformer")
    trained_e.save_pretrained(tmp_path / "w" / "text_encoder")
    fresh_t, fresh_e = build_transformer(cfg), build_text_encoder(cfg, len(tok))
    load_initial_weights(fresh_t, fresh_e, tmp_path / "w")
    for a, b in ((fresh_t, trained_t), (fresh_e, trained_e)):
        ref = b.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in a.state_dict().items())
    wider = tiny_transformer_config(model={"embed_dim": 128})
    with pytest.raises(common.CheckpointError, match="do not fit"):
        load_initial_weights(build_transformer(wider), build_text_encoder(wider, len(tok)), tmp_path / "w")


def test_a_deeper_transformer_starts_as_the_trained_one(tmp_path):
    """Growing the depth at --init-from keeps what the model computes: the trained blocks in order, new blocks that
    pass their input through (zeroed residual outputs) until training moves them."""
    tok = _tokenizer()
    cfg = tiny_transformer_config(model={"depth": 3})
    trained_t, trained_e = build_transformer(cfg), build_text_encoder(cfg, len(tok))
    with torch.no_grad():
        for prm in trained_t.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    trained_t.save_pretrained(tmp_path / "w" / "transformer")
    trained_e.save_pretrained(tmp_path / "w" / "text_encoder")
    deep_cfg = tiny_transformer_config(model={"depth": 5})
    deep_t, deep_e = build_transformer(deep_cfg), build_text_encoder(deep_cfg, len(tok))
    load_initial_weights(deep_t, deep_e, tmp_path / "w")
    old, new = trained_t.state_dict(), deep_t.state_dict()
    for i, j in enumerate((0, 2, 4)):  # spread evenly, first and last in place
        assert all(torch.equal(new[f"blocks.{j}.{k[9:]}"], v) for k, v in old.items() if k.startswith(f"blocks.{i}."))
    for j in (1, 3):
        assert not deep_t.blocks[j].ffn.fc2.weight.any() and not deep_t.blocks[j].sa.proj.weight.any()
        assert deep_t.blocks[j].ffn.fc1.weight.any()  # the rest is trainable from its own initialisation
    text = encode_captions(tok, trained_e.eval(), ["a red circle on a gray background"], torch.device("cpu"))
    outs = [m.eval().generate(text, cfg.schedule(), cfg=2.0, generator=torch.Generator().manual_seed(0)).summed_codes
            for m in (trained_t, deep_t)]
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(common.CheckpointError, match="cannot grow"):
        load_initial_weights(build_transformer(tiny_transformer_config(model={"depth": 2})), deep_e, tmp_path / "w")


# ------------------------------------------------------------------------------------------------- small pieces


def test_learning_rate_schedule_and_time_budget():
    assert common.lr_at(0, 1.0, 4, 100, 0.1) == pytest.approx(0.25)
    assert common.lr_at(4, 1.0, 4, 100, 0.1) == pytest.approx(1.0)
    assert common.lr_at(100, 1.0, 4, 100, 0.1) == pytest.approx(0.1)
    assert common.lr_at(50, 1.0, 4, None, 0.1) == 1.0  # total not measured yet: peak
    budget = common.Budget(minutes=1.0, skip_steps=1, calibration_steps=2)
    cpu = torch.device("cpu")
    assert budget.observe(1, 1, 0.0, cpu) is None
    assert budget.observe(2, 2, 0.0, cpu) is None
    total = budget.observe(3, 3, 1.0, cpu)
    assert total is not None and total > 3
    assert budget.done(5, None, 61.0) and not budget.done(5, None, 10.0)
    with pytest.raises(common.InvalidCaseError):
        common.Budget()


def test_configs_in_the_repo_are_the_defaults_and_overrides_parse():
    from editinfinity.train.toy import TRANSFORMER_CONFIG, VAE_CONFIG

    assert common.load_config(VAEConfig, VAE_CONFIG) == VAEConfig()
    assert common.load_config(TransformerConfig, TRANSFORMER_CONFIG) == TransformerConfig()
    over = common.parse_overrides(["lr=1e-3", "model.depth=2", "resolution=[[1,1],[2,2]]"])
    cfg = common.load_config(TransformerConfig, TRANSFORMER_CONFIG, {**over, "image_size": 32})
    assert cfg.lr == 1e-3 and cfg.model["depth"] == 2 and cfg.model["embed_dim"] == 256
    with pytest.raises(common.InvalidCaseError, match="unknown training setting"):
        common.load_config(VAEConfig, overrides={"batchsize": 3})


def test_keep_region_excludes_the_mask_cells_and_their_neighbours():
    mask = np.zeros((64, 64), bool)
    mask[20, 20] = True  # one pixel in cell (1, 1)
    keep = keep_region(mask, cell=16)
    assert not keep[0:48, 0:48].any() and keep[48:, :].all() and keep[:, 48:].all()


def test_train_commands_register_with_handlers():
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    for argv in (["train-vae", "--out", "x"], ["train", "--out", "x", "--vae", "v"], ["train-toy", "--out", "x"]):
        args = parser.parse_args(argv)
        assert callable(args.handler)


# ------------------------------------------------------------------------------------------------- driver + eval


def _tiny_driver_args(out: Path) -> list[str]:
    args = ["--out", str(out), "--device", "cpu", "--workers", "0", "--vae-minutes", "0", "--vae-steps", "2",
            "--transformer-minutes", "0", "--transformer-steps", "2", "--check-images", "2",
            "--transformer-set", "sample_images=2", "--transformer-set", "extra_cfgs=[]"]
    for k, v in TINY_VAE.items():
        if k == "model":
            args += [a for kk, vv in v.items() for a in ("--vae-set", f"model.{kk}={json.dumps(vv)}")]
        elif k not in ("minutes", "workers"):
            args += ["--vae-set", f"{k}={json.dumps(v)}"]
    for k, v in TINY_TRANSFORMER.items():
        if k == "model":
            args += [a for kk, vv in v.items() for a in ("--transformer-set", f"model.{kk}={json.dumps(vv)}")]
        elif k not in ("minutes", "workers", "sample_images"):
            args += ["--transformer-set", f"{k}={json.dumps(v)}"]
    return args


def test_toy_driver_writes_a_loadable_directory_and_the_eval_script_runs_on_it(tmp_path):
    from editinfinity.train.toy import main

    out = tmp_path / "toy"
    assert main(_tiny_driver_args(out)) == 0
    for part in ("vae", "transformer", "text_encoder", "tokenizer"):
        assert (out / part).is_dir(), part
    assert json.loads((out / "model_index.json").read_text())["editinfinity_preset"] == "toy"
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} <= {torch.float16}
    record = json.loads((out / "training.json").read_text())
    assert record["vae"]["steps"] == 2 and record["transformer"]["steps"] == 2
    assert record["weights"]["total_bytes"] <= 40 * 2**20
    assert record["checks"]["load_models"] == "ok" and record["checks"]["dtypes"]["vae"] == "torch.float32"
    assert record["transformer"]["samples"]["generations"] == 2
    assert "toy" in (out / "MODEL_CARD.md").read_text()

    models = load_models("toy", weights=str(out), device="cpu")
    x = render_batch([tw.sample_scene(0)])
    codes = multiscale_quantize(models.vae.encode_raw(x), [(1, 1, 1), (1, 4, 4), (1, 16, 16)])
    assert models.vae.decode(codes.summed_codes).shape == (1, 3, 256, 256)

    # a second run reuses the VAE and starts the transformer from the first run's weights
    out2 = tmp_path / "toy2"
    assert main(_tiny_driver_args(out2) + ["--vae-from", str(out / "vae"), "--init-from", str(out)]) == 0
    record2 = json.loads((out2 / "training.json").read_text())
    assert record2["vae"]["from"] == str(out / "vae") and record2["vae"]["steps"] == 2
    assert record2["transformer"]["config"]["init_from"] == str(out)
    assert (out2 / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert "--init-from" in (out2 / "MODEL_CARD.md").read_text()
    assert not (tmp_path / "toy2.work" / "vae").exists()

    from editinfinity.evaluation import toy_eval
    report_path = tmp_path / "eval.json"
    assert toy_eval.main(["--weights", str(out), "--device", "cpu", "--limit", "2", "--prompt-iters", "1",
                          "--lora-iters", "1", "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["vae"]["images"] == 2 and report["text_to_image"]["generations"] == 2
    assert set(report["edits"]) == {"auto", "mask", "whole"}
    assert all(report["edits"][m]["cases"] == 2 for m in report["edits"])
    assert report["limited"] and set(report["passed"]) >= {"vae_psnr", "text_to_image", "edit_auto_present"}
    assert all(not report["edits"][m]["truncated"] for m in report["edits"])

    # mask variants learned once per case, in two shards, merged: the pooled cases and recomputed summaries
    shards = []
    for i in (0, 1):
        shards.append(tmp_path / f"shard{i}.json")
        assert toy_eval.main(["--weights", str(out), "--device", "cpu", "--vae-images", "0", "--generations", "0",
                              "--edits", "3", "--mask-edits", "0", "--whole-edits", "0", "--prompt-iters", "1",
                              "--lora-iters", "1", "--variant", "holes:fill_holes=1,min_region=0.01",
                              "--shard", f"{i}/2", "--keep-cases", "--out", str(shards[i])]) == 0
    assert [json.loads(p.read_text())["edits"]["auto"]["cases"] for p in shards] == [2, 1]
    assert toy_eval.main(["--merge", *map(str, shards), "--out", str(report_path), "--overwrite"]) == 0
    merged = json.loads(report_path.read_text())
    auto, holes = merged["edits"]["auto"], merged["edits"]["auto_variants"]["holes"]
    assert [r["case"] for r in auto["results"]] == [0, 1, 2] == [r["case"] for r in holes["results"]]
    assert holes["settings"] == {"fill_holes": True, "min_region": 0.01} and "mask_iou_mean" in holes
    assert auto["present_rate"] == np.mean([r["present"] for r in auto["results"]]) and not merged["limited"]

    # the calibration seed set: other scenes and cases, and the report says which set it used
    assert toy_eval.main(["--weights", str(out), "--device", "cpu", "--seeds", "calibration", "--vae-images", "0",
                          "--generations", "1", "--edits", "0", "--mask-edits", "0", "--whole-edits", "0",
                          "--keep-cases", "--out", str(report_path), "--overwrite"]) == 0
    report = json.loads(report_path.read_text())
    from editinfinity.train.scenes import CALIBRATION_SEED_BASE, heldout_scenes
    assert report["seeds"]["set"] == "calibration" and report["seeds"]["scenes_from"] == CALIBRATION_SEED_BASE
    first = heldout_scenes(1, base=CALIBRATION_SEED_BASE)[0]
    assert report["text_to_image"]["cases"][0]["caption"] == tw.caption(first)

    # out of time: the edit sections stop before their first case and the JSON says so
    assert toy_eval.main(["--weights", str(out), "--device", "cpu", "--limit", "1", "--max-minutes", "1e-6",
                          "--out", str(report_path), "--overwrite"]) == 0
    report = json.loads(report_path.read_text())
    assert report["vae"]["images"] == 1 and report["limited"]
    assert all(e["truncated"] and e["cases"] == 0 for e in report["edits"].values())
    assert report["passed"]["edit_auto_present"] is None  # not measured, neither passed nor failed

    # sections asked for 0 items are skipped (no division by zero), and say so in "passed"
    assert toy_eval.main(["--weights", str(out), "--device", "cpu", "--vae-images", "0", "--generations", "0",
                          "--edits", "0", "--mask-edits", "1", "--whole-edits", "0", "--prompt-iters", "1",
                          "--lora-iters", "1", "--out", str(report_path), "--overwrite"]) == 0
    report = json.loads(report_path.read_text())
    assert "vae" not in report and "text_to_image" not in report and set(report["edits"]) == {"mask"}
    assert set(report["passed"]) >= {"vae_psnr", "text_to_image", "edit_auto_present", "edit_auto_mask_iou"}
    assert set(report["passed"].values()) == {None}


def test_lineage_keeps_the_whole_history_of_chained_init_from_runs(tmp_path):
    from editinfinity.train.toy import lineage

    def record(d: Path, commands, steps, seconds, started_from=None):
        d.mkdir()
        tr = {"steps": steps, "seconds": seconds, **({"started_from": started_from} if started_from else {})}
        (d / "training.json").write_text(json.dumps({"commands": commands, "transformer": tr}))
        return d

    first = record(tmp_path / "a", ["train a", "decoder a"], 10, 60.0)
    second = record(tmp_path / "b", ["train b"], 5, 30.0, lineage(first))
    third = record(tmp_path / "c", ["train c"], 2, 12.0, lineage(second))
    got = lineage(third)
    assert got["commands"] == ["train a", "decoder a", "train b", "train c"]
    assert (got["steps"], got["total_steps"], got["total_seconds"]) == (2, 17, 102.0)
    assert lineage(tmp_path / "nothing") is None


def test_weights_exported_mid_run_keep_their_lineage(tmp_path, vae_dir):
    """A run cut short (a device call's end) leaves weights exported at a checkpoint; a run started from them must
    still count the steps and commands behind them (the shipped toy weights came from such a chain)."""
    from editinfinity.train.toy import lineage, progress_record

    earlier = {"steps": 7, "seconds": 40.0, "total_steps": 30, "total_seconds": 200.0, "commands": ["train a"]}
    cfg = tiny_transformer_config(steps=5)
    part = train_transformer(cfg, tmp_path / "run", vae_dir, device="cpu", stop_at=3)
    out = tmp_path / "out"
    out.mkdir()
    rec = progress_record(tmp_path / "run", cfg, earlier)
    (out / "training.json").write_text(json.dumps({"commands": ["train b"], "transformer": rec}))
    got = lineage(out)
    assert rec["in_progress"] and got["steps"] == part.steps == 3
    assert got["total_steps"] == 30 + 3 and got["commands"] == ["train a", "train b"]
    assert got["total_seconds"] == pytest.approx(200.0 + rec["seconds"], abs=0.11) and rec["seconds"] > 0
    assert progress_record(tmp_path / "nothing", cfg, None)["steps"] == 0


def test_toy_driver_records_progress_with_every_checkpoint_export(tmp_path, monkeypatch):
    """The driver's own wiring: a run that dies after a checkpoint export leaves a training.json that says how far
    the exported weights were trained."""
    import editinfinity.train.toy as toy

    calls = []
    real = toy.export_text_encoder

    def export_then_die(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("the pod was stopped")
        return real(*a, **kw)

    monkeypatch.setattr(toy, "export_text_encoder", export_then_die)
    out = tmp_path / "toy"
    args = _tiny_driver_args(out) + ["--transformer-set", "checkpoint_minutes=0", "--transformer-steps", "3"]
    with pytest.raises(KeyboardInterrupt):
        toy.main(args)
    rec = json.loads((out / "training.json").read_text())["transformer"]
    assert rec["in_progress"] and rec["steps"] == 1 and rec["config"]["batch_size"] == TINY_TRANSFORMER["batch_size"]


def test_scene_batch_two_shape_share_is_configurable_and_seeded():
    default = scene_batch(4, 2, 9, 300)
    assert default == scene_batch(4, 2, 9, 300, two_shape_prob=None)  # None keeps the world's own sampler
    share = [sum(len(s.shapes) == 2 for s in scene_batch(4, 2, 9, 300, two_shape_prob=p)) / 300
             for p in (0.0, 0.8, 1.0)]
    assert share[0] == 0.0 and share[2] == 1.0 and 0.7 < share[1] < 0.9
    assert scene_batch(4, 2, 9, 50, two_shape_prob=0.8) == scene_batch(4, 2, 9, 50, two_shape_prob=0.8)
    with pytest.raises(ValueError, match="two_shape_prob"):
        scene_batch(4, 2, 9, 5, two_shape_prob=1.5)
    with pytest.raises(ValueError, match="two_shape_prob"):
        TransformerConfig(two_shape_prob=-0.1).validate()


def test_model_folder_swaps_use_private_names_and_a_killed_saves_are_cleaned_or_put_back(tmp_path):
    import subprocess
    import sys

    from editinfinity.storage.base import host_name, private_path

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    run = tmp_path / "run"
    run.mkdir()
    # a save killed between moving the previous checkpoint aside and renaming the new one in
    aside = run / f".{common.CHECKPOINT}.editinfinity-old-{host_name()}-{gone}-0a1b2c"
    aside.mkdir()
    (aside / common.STATE_FILE).write_bytes(b"state")
    dead_tmp = run / f".model.editinfinity-tmp-{host_name()}-{gone}-0a1b2c"
    other_host = run / ".model.editinfinity-tmp-elsewhere-1-0a1b2c"
    for p in (dead_tmp, other_host):
        p.mkdir()
    assert common.find_checkpoint(run) == run / common.CHECKPOINT
    assert (run / common.CHECKPOINT / common.STATE_FILE).read_bytes() == b"state"

    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.name.startswith(".model.editinfinity-tmp-") and f"-{host_name()}-" in tmp.name
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(b"%d" % len(seen))

    common.save_dir(run / "model", write)
    common.save_dir(run / "model", write)
    assert seen[0] != seen[1] and (run / "model" / "w.bin").read_bytes() == b"2"
    assert sorted(p.name for p in run.iterdir()) == sorted([common.CHECKPOINT, "model", other_host.name])
    with pytest.raises(RuntimeError):
        common.save_dir(run / "model", lambda tmp: (tmp.mkdir(), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert sorted(p.name for p in run.iterdir()) == sorted([common.CHECKPOINT, "model", other_host.name])
    assert private_path(run / "model") != private_path(run / "model")
