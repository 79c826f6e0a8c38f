"""The toy world: scenes, captions, edits, the model-free analyser, and the toy tokenizer."""

import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from editinfinity import toyworld as tw

N_ANALYSER_SCENES = 200


def _blur_noise(img: Image.Image, seed: int, radius: float = 1.5, sigma: float = 8.0) -> Image.Image:
    blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, sigma, blurred.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def _vae_like(img: Image.Image, seed: int) -> Image.Image:
    """Rough stand-in for a VAE round trip: detail lost at 1/4 resolution, a colour cast, noise."""
    rng = np.random.default_rng(seed)
    small = img.resize((img.width // 4, img.height // 4), Image.BILINEAR)
    back = np.asarray(small.resize(img.size, Image.BICUBIC), dtype=np.float32)
    back = back + rng.uniform(-12.0, 12.0, 3) + rng.normal(0.0, 6.0, back.shape)
    return Image.fromarray(np.clip(np.rint(back), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def scenes() -> list[tw.Scene]:
    return [tw.sample_scene(seed) for seed in range(N_ANALYSER_SCENES)]


# ---------------------------------------------------------------------------------------------- scenes


def test_sample_scene_is_deterministic_per_seed():
    a, b = tw.sample_scene(7), tw.sample_scene(7)
    assert a == b
    assert tw.render(a).tobytes() == tw.render(b).tobytes()
    assert tw.sample_scene(8) != a
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert [tw.sample_scene(g1) for _ in range(3)] == [tw.sample_scene(g2) for _ in range(3)]
    assert tw.Scene.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("size", [(256, 256), (320, 256), (256, 320)])
def test_scene_constraints(scenes, size):
    width, height = size
    pool = scenes if size == (256, 256) else [tw.sample_scene(s, width, height) for s in range(60)]
    counts = {1: 0, 2: 0}
    for scene in pool:
        assert (scene.width, scene.height) == (width, height)
        assert scene.background in tw.PALETTE
        assert 1 <= len(scene.shapes) <= 2
        counts[len(scene.shapes)] += 1
        for s in scene.shapes:
            assert s.kind in tw.KINDS and s.colour in tw.PALETTE
            assert s.colour != scene.background
            assert 0.20 * width - 1e-6 <= s.size <= 0.45 * width + 1e-6
            x0, y0, x1, y1 = s.bbox
            assert x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height
        assert tw.scene_problems(scene) == []
    assert counts[1] > 0 and counts[2] > 0
    one = tw.sample_scene(0, width, height, n_shapes=1)
    two = tw.sample_scene(0, width, height, n_shapes=2)
    assert len(one.shapes) == 1 and len(two.shapes) == 2


def test_scene_problems_flags_broken_scenes():
    ok = tw.Scene("blue", (tw.Shape("circle", "red", 128, 128, 80),))
    assert tw.scene_problems(ok) == []
    assert tw.scene_problems(tw.Scene("red", (tw.Shape("circle", "red", 128, 128, 80),)))
    assert tw.scene_problems(tw.Scene("blue", (tw.Shape("circle", "red", 128, 128, 30),)))  # too small
    assert tw.scene_problems(tw.Scene("blue", (tw.Shape("circle", "red", 20, 128, 80),)))  # outside
    hidden = tw.Scene(
        "blue", (tw.Shape("circle", "red", 128, 128, 60), tw.Shape("square", "green", 128, 128, 110))
    )
    assert any("visible" in p for p in tw.scene_problems(hidden))
    touching = tw.Scene(
        "blue", (tw.Shape("circle", "red", 80, 128, 70), tw.Shape("square", "red", 150, 128, 70))
    )
    assert any("share the colour" in p for p in tw.scene_problems(touching))
    with pytest.raises(ValueError, match="teal"):
        tw.Shape("circle", "teal", 1, 1, 1)


def test_render_colours_and_masks_are_exact(scenes):
    for scene in scenes[:40]:
        arr = np.asarray(tw.render(scene))
        assert arr.shape == (scene.height, scene.width, 3)
        covered = np.zeros(arr.shape[:2], dtype=bool)
        for i, s in enumerate(scene.shapes):
            m = tw.render_mask(scene, i)
            assert m.dtype == bool and m.any()
            assert not (m & covered).any()
            assert (arr[m] == tw.PALETTE[s.colour]).all()
            covered |= m
        assert (arr[~covered] == tw.PALETTE[scene.background]).all()
        top = len(scene.shapes) - 1
        assert (
            tw.render_mask(scene, top) == tw.shape_mask(scene.shapes[top], scene.width, scene.height)
        ).all()


def test_shape_fill_ratios():
    for kind, ratio in [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)]:
        m = tw.shape_mask(tw.Shape(kind, "red", 128, 128, 100), 256, 256)
        assert abs(m.sum() / 100**2 - ratio) < 0.02


def test_render_noise_is_seedable_and_mild():
    scene = tw.sample_scene(1)
    clean = np.asarray(tw.render(scene), dtype=np.float32)
    a = np.asarray(tw.render(scene, noise=3.0, seed=5))
    assert (a == np.asarray(tw.render(scene, noise=3.0, seed=5))).all()
    assert (a != np.asarray(tw.render(scene, noise=3.0, seed=6))).any()
    # without a seed the noise is still a pure function of the scene
    assert tw.render(scene, noise=3.0).tobytes() == tw.render(scene, noise=3.0).tobytes()
    assert 1.0 < np.abs(a - clean).mean() < 4.0


# ---------------------------------------------------------------------------------------------- captions


def test_caption_grammar_and_round_trip(scenes):
    one = tw.Scene("white", (tw.Shape("triangle", "red", 100, 100, 60),))
    assert tw.caption(one) == "a red triangle on a white background"
    two = tw.Scene(
        "gray", (tw.Shape("circle", "blue", 60, 60, 60), tw.Shape("square", "green", 180, 180, 60))
    )
    assert tw.caption(two) == "a blue circle and a green square on a gray background"
    for scene in scenes:
        text = tw.caption(scene)
        parsed = tw.parse_caption(text)
        assert parsed.describes(scene)
        assert parsed.background == scene.background
        assert parsed.objects == tuple((s.colour, s.kind) for s in scene.shapes)
        assert tw.parse_caption(text + tw.STYLE_SUFFIX) == parsed
        assert tw.parse_caption("  " + text.capitalize() + ". ") == parsed


@pytest.mark.parametrize(
    "text, match",
    [
        ("a red zebra on a blue background", "zebra"),
        ("a teal circle on a blue background", "teal"),
        ("a red circle on a blue", "does not follow"),
        ("red circle on a blue background", "does not follow"),
        ("a red circle and on a blue background", "does not follow"),
        ("a red circle and a blue square and a green circle on a white background", "3 objects"),
    ],
)
def test_parse_caption_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        tw.parse_caption(text)


def test_style_suffix_matches_text_module():
    try:
        from editinfinity.models import text
    except ImportError:
        pytest.skip("editinfinity.models.text not available")
    assert tw.STYLE_SUFFIX == text.STYLE_SUFFIX


# ---------------------------------------------------------------------------------------------- analyser


def _accuracy(scenes, transform) -> float:
    hits = sum(tw.matches(transform(tw.render(s), i), s) for i, s in enumerate(scenes))
    return hits / len(scenes)


def test_analyser_recovers_every_object_clean(scenes):
    assert _accuracy(scenes, lambda img, i: img) >= 0.98
    scene = scenes[0]
    result = tw.analyse(tw.render(scene), scene)
    assert result["background"] == scene.background
    assert result["expected"]["matches"]
    for verdict in result["expected"]["objects"]:
        assert verdict["colour_ok"] and verdict["kind_ok"]
        assert verdict["centre_error"] < 0.03


def test_analyser_is_robust_to_blur_and_noise(scenes):
    assert _accuracy(scenes, _blur_noise) >= 0.98


def test_analyser_is_robust_to_vae_like_degradation(scenes):
    assert _accuracy(scenes[:100], _vae_like) >= 0.98


def test_analyser_other_aspect_ratio():
    pool = [tw.sample_scene(s, 320, 256) for s in range(50)]
    assert _accuracy(pool, _blur_noise) >= 0.98


def test_analyser_measures_objects(scenes):
    for scene in scenes[:30]:
        result = tw.analyse(tw.render(scene))
        assert len(result["objects"]) == len(scene.shapes)
        for i, s in enumerate(scene.shapes):
            visible = tw.render_mask(scene, i)
            found = [o for o in result["objects"] if o["colour"] == s.colour and o["kind"] == s.kind]
            assert found
            obj = min(found, key=lambda o: abs(o["centre"][0] - s.cx) + abs(o["centre"][1] - s.cy))
            assert abs(obj["area"] - visible.sum()) <= 0.05 * visible.sum()
            assert abs(obj["size"] - s.size) <= 0.05 * s.size + 2


def test_analyser_ignores_specks_and_accepts_arrays():
    scene = tw.Scene("green", (tw.Shape("square", "red", 128, 128, 80),))
    arr = np.asarray(tw.render(scene)).copy()
    arr[5:12, 5:12] = tw.PALETTE["blue"]  # a speck far below the smallest object
    result = tw.analyse(arr)
    assert [(o["colour"], o["kind"]) for o in result["objects"]] == [("red", "square")]
    assert tw.analyse(arr.astype(np.float32) / 255.0)["objects"][0]["kind"] == "square"
    empty = tw.analyse(Image.new("RGB", (256, 256), tw.PALETTE["black"]))
    assert empty["background"] == "black" and empty["objects"] == []


def test_matches_and_attribute_present():
    scene = tw.Scene(
        "white", (tw.Shape("circle", "blue", 80, 90, 90), tw.Shape("triangle", "orange", 170, 170, 100))
    )
    img = _blur_noise(tw.render(scene), 0)
    assert tw.matches(img, scene)
    assert tw.matches(img, scene, position_tolerance=0.03)
    moved = tw.Scene(scene.background, (replace(scene.shapes[0], cx=150, cy=60), scene.shapes[1]))
    assert tw.matches(img, moved) and not tw.matches(img, moved, position_tolerance=0.03)
    assert not tw.matches(img, tw.edit_scene(scene, 0, colour="red"))
    assert not tw.matches(img, tw.edit_scene(scene, 1, kind="square"))
    assert not tw.matches(img, tw.Scene("white", scene.shapes[:1]))
    assert tw.attribute_present(img, "blue", "circle")
    assert tw.attribute_present(img, "orange", None) and tw.attribute_present(img, None, "triangle")
    assert not tw.attribute_present(img, "blue", "triangle")
    assert not tw.attribute_present(img, "red", None)
    with pytest.raises(ValueError):
        tw.attribute_present(img, "teal", None)


# ---------------------------------------------------------------------------------------------- edits


def test_edit_scene():
    scene = tw.Scene(
        "gray", (tw.Shape("circle", "blue", 60, 60, 60), tw.Shape("square", "green", 180, 180, 60))
    )
    edited = tw.edit_scene(scene, 1, colour="red")
    assert edited.shapes[1] == replace(scene.shapes[1], colour="red")
    assert edited.shapes[0] == scene.shapes[0] and scene.shapes[1].colour == "green"
    assert tw.edit_scene(scene, 0, kind="triangle").shapes[0].kind == "triangle"
    with pytest.raises(ValueError, match="background"):
        tw.edit_scene(scene, 0, colour="gray")
    with pytest.raises(ValueError, match="nothing"):
        tw.edit_scene(scene, 0, colour="blue")
    with pytest.raises(ValueError):
        tw.edit_scene(scene, 0, kind="hexagon")
    with pytest.raises(IndexError):
        tw.edit_scene(scene, 2, colour="red")


def test_edit_cases_are_valid_and_deterministic():
    attributes = set()
    for seed in range(40):
        case = tw.make_edit_case(seed)
        again = tw.make_edit_case(seed)
        assert case["prompt"] == again["prompt"] and case["edit_prompt"] == again["edit_prompt"]
        assert case["source_scene"] == again["source_scene"] and case["edited_scene"] == again["edited_scene"]
        assert case["image"].tobytes() == again["image"].tobytes() and (case["mask"] == again["mask"]).all()

        src, dst, idx = case["source_scene"], case["edited_scene"], case["index"]
        attributes.add(case["attribute"])
        assert tw.scene_problems(src) == [] and tw.scene_problems(dst) == []
        assert case["prompt"] == tw.caption(src) and case["edit_prompt"] == tw.caption(dst)

        # the target word occurs exactly once, as a whole word, and names the edited object
        target = case["target_word"]
        assert len(re.findall(rf"\b{re.escape(target)}\b", case["prompt"])) == 1
        assert target in (src.shapes[idx].colour, src.shapes[idx].kind)

        # the edit prompt differs in exactly the edited attribute's word
        before, after = case["prompt"].split(), case["edit_prompt"].split()
        assert len(before) == len(after)
        diff = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert diff == [(case["old_value"], case["new_value"])]
        field = "colour" if case["attribute"] == "colour" else "kind"
        assert getattr(src.shapes[idx], field) == case["old_value"]
        assert dst.shapes[idx] == replace(src.shapes[idx], **{field: case["new_value"]})
        assert all(a == b for i, (a, b) in enumerate(zip(src.shapes, dst.shapes, strict=True)) if i != idx)

        # the mask covers every changed pixel and the edited object
        mask = case["mask"]
        assert mask.dtype == bool and mask.shape == (src.height, src.width)
        changed = (np.asarray(tw.render(src)) != np.asarray(case["edited_image"])).any(-1)
        assert changed.any() and not (changed & ~mask).any()
        assert (tw.render_mask(src, idx) <= mask).all()
        assert np.asarray(case["image"]).tobytes() == tw.render(src).tobytes()
        assert tw.matches(case["edited_image"], dst) and tw.matches(case["image"], src)
    assert attributes == {"colour", "kind"}
    assert tw.make_edit_case(3, attribute="kind")["attribute"] == "kind"
    noisy = tw.make_edit_case(3, noise=3.0)
    assert noisy["image"].tobytes() != tw.render(noisy["source_scene"]).tobytes()


def test_edit_case_prefers_unique_target_word():
    # Two objects of one kind: a kind edit must target the colour word instead.
    for seed in range(200):
        case = tw.make_edit_case(seed, attribute="kind")
        src = case["source_scene"]
        if len(src.shapes) == 2 and src.shapes[0].kind == src.shapes[1].kind:
            assert case["target_word"] == src.shapes[case["index"]].colour
            return
    pytest.fail("no kind edit with two objects of one kind among 200 seeds")


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tw.build_tokenizer(tmp_path_factory.mktemp("toy_tokenizer"))


def _all_captions() -> list[str]:
    out = []
    for bg in tw.COLOURS:
        shape_colours = [c for c in tw.COLOURS if c != bg]
        objs = [f"a {c} {k}" for c in shape_colours for k in tw.KINDS]
        out += [f"{o} on a {bg} background" for o in objs]
        out += [f"{o1} and {o2} on a {bg} background" for o1 in objs for o2 in objs]
    return out


def test_tokenizer_encodes_every_caption(tokenizer_dir):
    from transformers import AutoTokenizer

    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        assert (tokenizer_dir / name).is_file()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), legacy=True)
    assert tok.is_fast
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    captions = _all_captions()
    assert len(captions) == 9 * 24 + 9 * 24 * 24
    texts = captions + [c + tw.STYLE_SUFFIX for c in captions]
    enc = tok(texts)
    for i, ids in enumerate(enc["input_ids"]):
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids, texts[i]
        word_ids = enc.word_ids(i)
        assert word_ids[-1] is None and None not in word_ids[:-1]
        # every word of the world is a single piece (a comma joins the word before it)
        assert len(ids) - 1 == len(texts[i].replace(",", " ,").split())
        assert max(word_ids[:-1]) + 1 == len(texts[i].split())
    for word in tw.vocabulary():
        assert len(tok(word)["input_ids"]) == 2, word  # one piece + </s>


def test_tokenizer_matches_sentencepiece_and_is_robust(tokenizer_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), legacy=True)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spiece.model"))
    for text in _all_captions()[::97] + ["A Red Zebra, 12 wheels!", "  a  red   circle ", "ａ ｒｅｄ circle"]:
        assert tok(text)["input_ids"] == sp.encode(text) + [1], text
    assert tok.unk_token_id not in tok("The Quick brown fox-jumps 42 times.")["input_ids"]
    # NFKC normalisation (SentencePiece's nmt_nfkc charsmap) is carried into tokenizer.json
    assert tok("ａ ｒｅｄ circle")["input_ids"] == tok("a red circle")["input_ids"]


def test_tokenizer_build_is_reproducible(tokenizer_dir, tmp_path):
    again = tw.build_tokenizer(tmp_path / "again")
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_tiny_t5_config_builds_an_encoder(tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), legacy=True)
    cfg = tw.tiny_t5_config(len(tok))
    assert cfg.vocab_size == len(tok) and cfg.d_model == 128
    torch.manual_seed(0)
    model = T5EncoderModel(cfg).eval()
    batch = tok(
        ["a red circle on a blue background", "a red circle" + tw.STYLE_SUFFIX],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (2, batch["input_ids"].shape[1], 128) and torch.isfinite(out).all()


def test_calibration_seeds_are_disjoint_from_the_evaluation_seeds():
    # a preset's inference defaults are chosen on the calibration set; the evaluation's held-out sets must differ
    from editinfinity.evaluation.toy_judge import edit_cases
    from editinfinity.train.scenes import SEED_SETS, heldout_scenes

    (scene_held, edit_held), (scene_cal, edit_cal) = SEED_SETS["heldout"], SEED_SETS["calibration"]
    assert len({scene_held, edit_held, scene_cal, edit_cal}) == 4
    held = [tw.caption(s) + repr(s) for s in heldout_scenes(30, base=scene_held)]
    cal = [tw.caption(s) + repr(s) for s in heldout_scenes(30, base=scene_cal)]
    assert not set(held) & set(cal)
    held_cases, cal_cases = edit_cases(10, base=edit_held), edit_cases(10, base=edit_cal)
    assert [c["case"] for c in cal_cases] == list(range(10))  # numbered from the set's own base
    assert not {repr(c["source_scene"]) for c in held_cases} & {repr(c["source_scene"]) for c in cal_cases}
