"""Text conditioning: T5 features, compaction, learned rows, word -> token ranges.

Parity tests read every string, token list, range and length from the fixture set: prompts and expected results
from ``manifest.json`` (``files[text_io.safetensors].encode_prompt_results`` / ``get_word_token_mapping``,
``settings.strings``, ``settings.token_ranges``), tensors from ``text_io.safetensors``. Tolerances come from the
"suggested tolerance" column of the fixture README (10x the drift of an independent float32 rerun, rounded up; the
drift itself is ``reproducibility.json``), parsed by ``tests/parity.py``: ``atol 2e-05`` for T5 rows, ``exact`` for
token ids and ``cu_seqlens``, ``exact; 1e-6 if your ops differ`` for the learned rows.

Unit tests use the fixture set's tiny SentencePiece tokenizer (``t5_tiny/``) because it is the only T5 tokenizer
available offline; they check properties (which characters a range spells), not stored numbers.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from editinfinity.errors import CheckpointError, InvalidCaseError
from editinfinity.models.text import (
    STYLE_SUFFIX,
    TextFeatures,
    encode_prompts,
    load_text_encoder,
    reference_word_token_mapping,
    style_prompt,
    target_token_range,
    tokenize_prompts,
    validate_prompts,
)
from parity import Fixture

FILE = "text_io.safetensors"


@pytest.fixture(scope="module")
def t5(parity_dir):
    return load_text_encoder(parity_dir / "t5_tiny")


@pytest.fixture(scope="module")
def tokenizer(t5):
    return t5[0]


@pytest.fixture(scope="module")
def text_io(parity_dir):
    return Fixture(FILE, parity_dir)


def _variants(text_io) -> dict[str, dict]:
    return text_io.entry["encode_prompt_results"]


def _is_styled(result: dict) -> bool:
    return result["prompt_encoded"] != result["prompt_given"]


def _spelled(tokenizer, prompt: str, span: tuple[int, int]) -> str:
    """The text a token range spells (SentencePiece word marks as spaces), for property checks."""
    ids = tokenizer(prompt)["input_ids"][span[0] : span[1]]
    return "".join(tokenizer.convert_ids_to_tokens(ids)).replace("\u2581", " ").strip()


# ----------------------------------------------------------------------------------------------------------------
# Parity: strings, token ids, T5 features
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_fixed_strings(manifest, text_io):
    strings = manifest["settings"]["strings"]
    assert STYLE_SUFFIX == strings["language_style_suffix"]
    assert style_prompt(strings["prompt_source"]) == strings["prompt_source_styled"]
    assert style_prompt(strings["prompt_edit"]) == strings["prompt_edit_styled"]
    assert text_io["language_style_offset"].shape[0] == strings["language_style_rows"]
    for name, res in _variants(text_io).items():
        expected = style_prompt(res["prompt_given"]) if _is_styled(res) else res["prompt_given"]
        assert res["prompt_encoded"] == expected, name


@pytest.mark.parity
def test_token_ids(tokenizer, text_io):
    assert tokenizer.model_max_length == 512
    for name, res in _variants(text_io).items():
        ids = tokenize_prompts(tokenizer, [res["prompt_encoded"]], max_length=text_io[f"{name}/input_ids"].shape[1])
        text_io.check(f"{name}/input_ids", ids["input_ids"].to(torch.int32))
        n = int(ids["attention_mask"].sum())
        assert n == res["lens"][0] - (text_io["language_style_offset"].shape[0] if _is_styled(res) else 0)
        assert tokenizer.convert_ids_to_tokens(ids["input_ids"][0, :n].tolist()) == res["tokens"], name


@pytest.mark.parity
@pytest.mark.parametrize("pad_to_max_length", [False, True], ids=["unpadded", "padded512"])
def test_t5_features_per_variant(t5, text_io, pad_to_max_length):
    tokenizer, encoder = t5
    offset = text_io["language_style_offset"]
    for name, res in _variants(text_io).items():
        styled = _is_styled(res)
        rows = offset.shape[0] if styled else 0
        text = encode_prompts(tokenizer, encoder, [res["prompt_encoded"]], extra_rows=rows,
                              pad_to_max_length=pad_to_max_length)
        assert text.features.dtype == torch.float32
        if styled:
            text = text.append_rows(offset)
            # The learned rows come through unchanged, after the EOS row.
            text_io.check("language_style_offset", text.features[-rows:])
        text_io.check(f"{name}/kv_compact", text.features)
        text_io.check(f"{name}/cu_seqlens_k", text.cu_seqlens)
        assert text.lens == res["lens"] and text.max_len == res["max_seqlen_k"], name


@pytest.mark.parity
def test_t5_features_batched_per_sample_rows(t5, text_io, manifest):
    """All prompts in one padded batch; learned rows go after *each* sample (the reference only handles B = 1; docs/method.md)."""
    tokenizer, encoder = t5
    offset = text_io["language_style_offset"]
    names = list(_variants(text_io))
    plain = [n for n in names if not _is_styled(_variants(text_io)[n])]
    styled = [n for n in names if _is_styled(_variants(text_io)[n])]
    assert plain and styled

    prompts = [_variants(text_io)[n]["prompt_encoded"] for n in plain]
    text = encode_prompts(tokenizer, encoder, prompts)
    for i, n in enumerate(plain):
        text_io.check(f"{n}/kv_compact", text.select(i).features)

    prompts = [_variants(text_io)[n]["prompt_encoded"] for n in styled]
    text = encode_prompts(tokenizer, encoder, prompts, extra_rows=offset.shape[0]).append_rows(offset)
    assert text.lens == [_variants(text_io)[n]["lens"][0] for n in styled]
    for i, n in enumerate(styled):
        text_io.check(f"{n}/kv_compact", text.select(i).features)

    # settings.token_ranges.lens: T5 rows (EOS included) before learned rows are appended.
    lens = manifest["settings"]["token_ranges"]["lens"]
    strings = manifest["settings"]["strings"]
    got = encode_prompts(tokenizer, encoder, [strings["prompt_source"], strings["prompt_edit"],
                                              strings["prompt_source_styled"], strings["prompt_edit_styled"]])
    assert got.lens == [lens["source"], lens["edit"], lens["source_styled"], lens["edit_styled"]]
    assert got.cu_seqlens.tolist() == [0, *torch.tensor(got.lens).cumsum(0).tolist()]


# ----------------------------------------------------------------------------------------------------------------
# Parity: word -> token mapping
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_reference_word_token_mapping(tokenizer, manifest, text_io):
    cases = manifest["settings"]["strings"]["word_token_mapping_cases"]
    stored = list(text_io.entry["get_word_token_mapping"].values())
    assert len(cases) == len(stored) > 0
    for case in cases:
        expected = [s for s in stored if s["prompt"] == case["prompt"] and s["target_words"] == case["target_words"]]
        assert len(expected) == 1, case
        exp = expected[0]
        assert tokenizer.convert_ids_to_tokens(tokenizer(case["prompt"])["input_ids"]) == exp["tokens"]
        got = reference_word_token_mapping(tokenizer, case["prompt"], case["target_words"])
        want = {k: tuple(v) for k, v in exp["mapping"].items()}
        assert got == want, case
        assert list(got) == list(want), case  # insertion order too (the reference returns a plain dict)


@pytest.mark.parity
def test_target_word_range_of_source(tokenizer, manifest):
    """settings.token_ranges.target_word_in_source, through both lookups."""
    prompt = manifest["settings"]["strings"]["prompt_source"]
    targets = manifest["settings"]["token_ranges"]["target_word_in_source"]
    assert list(targets) == manifest["settings"]["strings"]["target_words"]
    for word, span in targets.items():
        assert reference_word_token_mapping(tokenizer, prompt, [word]) == {word: tuple(span)}
        assert target_token_range(tokenizer, prompt, word) == tuple(span)


def test_target_range_agrees_with_reference_table(tokenizer, manifest):
    """Ours = reference for every word, given the reference's conventions (last occurrence; EOS on the last word)."""
    prompt = manifest["settings"]["strings"]["prompt_source"]
    table = reference_word_token_mapping(tokenizer, prompt, None)
    words = prompt.split()
    for word, (start, end) in table.items():
        last = words.count(word) - 1
        if word == words[-1]:
            end -= 1  # the reference's last word carries the EOS token; ours never does
        assert target_token_range(tokenizer, prompt, word, occurrence=last) == (start, end), word


# ----------------------------------------------------------------------------------------------------------------
# target_token_range (ours)
# ----------------------------------------------------------------------------------------------------------------


def test_target_range_punctuation(tokenizer):
    prompt = "a kitten on the grass, next to a ball"
    span = target_token_range(tokenizer, prompt, "grass")
    assert _spelled(tokenizer, prompt, span) == "grass"  # the comma token is not part of the word
    assert target_token_range(tokenizer, prompt, "grass,") == span
    assert target_token_range(tokenizer, prompt, "(grass)") == span


def test_target_range_case_insensitive(tokenizer):
    prompt = "a kitten sleeping on the green grass next to a red ball"
    span = target_token_range(tokenizer, prompt, "kitten")
    assert target_token_range(tokenizer, prompt, "KITTEN") == span
    assert target_token_range(tokenizer, prompt, "Kitten") == span


def test_target_range_repeated_word(tokenizer):
    prompt = "a kitten sleeping on the green grass next to a red ball"
    first = target_token_range(tokenizer, prompt, "a")
    second = target_token_range(tokenizer, prompt, "a", occurrence=1)
    assert first == (0, 1) and second[0] > first[1]
    assert _spelled(tokenizer, prompt, second) == "a"
    with pytest.raises(InvalidCaseError, match="occurs 2 time"):
        target_token_range(tokenizer, prompt, "a", occurrence=2)
    # word#N picks the N-th occurrence (1 = first); a missing one names the valid choices
    assert target_token_range(tokenizer, prompt, "a#2") == second
    assert target_token_range(tokenizer, prompt, "a#1") == first
    with pytest.raises(InvalidCaseError, match="a#1 .. a#2"):
        target_token_range(tokenizer, prompt, "a#3")
    with pytest.raises(InvalidCaseError, match="no letter or digit"):
        target_token_range(tokenizer, prompt, "\U0001F431")


def test_target_range_multi_word_and_end_of_prompt(tokenizer):
    prompt = "a kitten sleeping on the green grass next to a red ball"
    n_tokens = len(tokenizer(prompt)["input_ids"])  # includes EOS
    span = target_token_range(tokenizer, prompt, "red ball")
    assert _spelled(tokenizer, prompt, span) == "red ball"
    assert span[1] == n_tokens - 1  # prompt-final word: EOS excluded
    assert target_token_range(tokenizer, prompt, "  Red   BALL ") == span
    # Words separated by punctuation in the prompt still match a multi-word target.
    prompt2 = "a red, ball"
    assert _spelled(tokenizer, prompt2, target_token_range(tokenizer, prompt2, "red ball")) == "red, ball"


def test_target_range_whole_words_only(tokenizer):
    prompt = "a kitten sleeping on the green grass"
    with pytest.raises(InvalidCaseError):
        target_token_range(tokenizer, prompt, "kit")  # a prefix of "kitten" is not the word


def test_target_range_absent_word_lists_words(tokenizer):
    prompt = "a kitten on the grass, next to a ball"
    with pytest.raises(InvalidCaseError) as err:
        target_token_range(tokenizer, prompt, "dog")
    msg = str(err.value)
    assert "'dog'" in msg and prompt in msg
    assert "a, kitten, on, the, grass, next, to, a, ball" in msg  # words without their punctuation
    for bad, why in (("", "empty"), ("  ", "empty"), (",,", "no letter or digit")):
        with pytest.raises(InvalidCaseError, match=why):
            target_token_range(tokenizer, prompt, bad)


# ----------------------------------------------------------------------------------------------------------------
# TextFeatures
# ----------------------------------------------------------------------------------------------------------------


def _features(lens, c=3):
    n = sum(lens)
    return TextFeatures(torch.arange(n * c, dtype=torch.float32).view(n, c) + 1, list(lens))


def test_textfeatures_views():
    t = _features([2, 4, 1])
    assert t.batch_size == 3 and t.max_len == 4 and t.channels == 3
    assert t.cu_seqlens.dtype == torch.int32 and t.cu_seqlens.tolist() == [0, 2, 6, 7]
    x, mask = t.padded()
    assert x.shape == (3, 4, 3) and mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    for b, block in enumerate(t.split()):
        assert torch.equal(x[b, : t.lens[b]], block)
        assert torch.all(x[b, t.lens[b] :] == 0)
    with pytest.raises(ValueError):
        TextFeatures(torch.zeros(5, 3), [2, 2])


def test_textfeatures_append_rows_layout_and_grad():
    t = _features([2, 3])
    rows = torch.randn(2, 3, requires_grad=True)
    out = t.append_rows(rows)
    assert t.lens == [2, 3] and t.features.shape[0] == 5  # unchanged
    assert out.lens == [4, 5] and out.cu_seqlens.tolist() == [0, 4, 9]
    a, b = out.split()
    assert torch.equal(a[:2], t.split()[0]) and torch.equal(a[2:], rows.detach())
    assert torch.equal(b[:3], t.split()[1]) and torch.equal(b[3:], rows.detach())
    x, mask = out.padded()
    (x * mask[..., None]).sum().backward()
    assert torch.equal(rows.grad, torch.full_like(rows, 2.0))  # one copy per sample


def test_textfeatures_select_cat_repeat_to():
    t = _features([2, 3, 1])
    s = t.select(1)
    assert s.lens == [3] and torch.equal(s.features, t.split()[1])
    assert t.select([2, 0]).lens == [1, 2]
    assert t.select(slice(1, None)).lens == [3, 1]
    assert t.select(-1).lens == [1]
    c = t.cat(s)
    assert c.lens == [2, 3, 1, 3] and torch.equal(c.select(3).features, s.features)
    r = t.repeat(2)
    assert r.lens == [2, 3, 1] * 2 and torch.equal(r.select(4).features, t.select(1).features)
    assert t.to(dtype=torch.float64).features.dtype == torch.float64


def test_textfeatures_save_load_roundtrip(tmp_path):
    from safetensors import safe_open

    t = _features([4, 1, 3]).append_rows(torch.randn(2, 3))
    path = t.save(tmp_path / "text.safetensors", metadata={"prompt": "a kitten"})
    back = TextFeatures.load(path)
    assert back.lens == t.lens and torch.equal(back.features, t.features)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["prompt"] == "a kitten"
    with pytest.raises(InvalidCaseError, match="not found"):
        TextFeatures.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Encoding validation and loading
# ----------------------------------------------------------------------------------------------------------------


def test_encode_rejects_empty_prompt(t5):
    tokenizer, encoder = t5
    for bad in ([""], ["   "], []):
        with pytest.raises(InvalidCaseError):
            encode_prompts(tokenizer, encoder, bad)


def test_prompt_length_limit_with_learned_rows(t5):
    """T5 tokens + learned rows must fit the 512-row text table; the error names the prompt and the limit."""
    tokenizer, encoder = t5
    per_word = len(tokenizer("ball ball")["input_ids"]) - len(tokenizer("ball")["input_ids"])
    assert per_word == 1  # "ball" is one piece of the tiny vocabulary
    fits = " ".join(["ball"] * 491)  # 491 tokens + EOS + 20 rows = 512
    assert validate_prompts(tokenizer, [fits], extra_rows=20) == [492]
    too_long = fits + " ball"
    assert validate_prompts(tokenizer, [too_long]) == [493]
    with pytest.raises(InvalidCaseError, match=r"493 T5 tokens \+ 20 learned rows.*512") as err:
        encode_prompts(tokenizer, encoder, ["a kitten", too_long], extra_rows=20)
    assert "'ball ball" in str(err.value)


def test_load_text_encoder_frozen(t5):
    tokenizer, encoder = t5
    assert tokenizer.is_fast and tokenizer.model_max_length == 512
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_load_text_encoder_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_text_encoder(tmp_path / "no_such_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_text_encoder(tmp_path / "empty")

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        load_text_encoder("editinfinity-tests/no-such-t5")


def test_load_text_encoder_hub_id_from_offline_cache(parity_dir, tmp_path, monkeypatch):
    """A hub id resolves from the local cache without network when HF_HUB_OFFLINE is set."""
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--editinfinity-tests--t5-tiny"
    shutil.copytree(parity_dir / "t5_tiny", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tokenizer, encoder = load_text_encoder("editinfinity-tests/t5-tiny")
    assert tokenizer.model_max_length == 512 and not encoder.training


def test_load_text_encoder_converted_layout(parity_dir, tmp_path):
    """The ``tokenizer/`` + ``text_encoder/`` layout written by ``editinfinity convert`` loads too."""
    for sub in ("tokenizer", "text_encoder"):
        shutil.copytree(parity_dir / "t5_tiny", tmp_path / sub)
    tokenizer, encoder = load_text_encoder(tmp_path)
    assert tokenizer.model_max_length == 512 and not encoder.training
