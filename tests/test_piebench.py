"""PIE-Bench reader: run-length masks (against PnP-Inversion's decoder), entries -> cases, target words, malformed
entries (each named, none stops the others), and the toy-world data set in PIE-Bench's format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editinfinity.errors import InvalidCaseError
from editinfinity.evaluation.piebench import (
    EDIT_TYPES,
    MASK_SHAPE,
    PieBenchEntryError,
    choose_target_word,
    decode_mask,
    encode_mask,
    parse_entry,
    parse_types,
    read_piebench,
    strip_brackets,
)
from editinfinity.evaluation.toy import TOY_TYPES, build_toy_piebench, toy_case
from editinfinity.toyworld import parse_caption


def pnp_mask_decode(encoded_mask, image_shape=(512, 512)):
    """PnP-Inversion's evaluation/evaluate.py ``mask_decode``, verbatim in behaviour (per-pixel loop)."""
    length = image_shape[0] * image_shape[1]
    mask_array = np.zeros((length,))
    for i in range(0, len(encoded_mask), 2):
        splice_len = min(encoded_mask[i + 1], length - encoded_mask[i])
        for j in range(splice_len):
            mask_array[encoded_mask[i] + j] = 1
    mask_array = mask_array.reshape(image_shape[0], image_shape[1])
    mask_array[0, :] = 1
    mask_array[-1, :] = 1
    mask_array[:, 0] = 1
    mask_array[:, -1] = 1
    return mask_array


# ------------------------------------------------------------------------------------------------ masks


def test_decode_hand_computed():
    # Flat pixels 0,1 and 5,6,7 of a 3x4 picture, row-major.
    m = decode_mask([0, 2, 5, 3], shape=(3, 4), border=False)
    assert m.tolist() == [[True, True, False, False], [False, True, True, True], [False, False, False, False]]
    # With the frame: only the interior of a 4x5 picture keeps the annotation.
    framed = decode_mask([6, 1], shape=(4, 5))
    expect = np.ones((4, 5), bool)
    expect[1:3, 1:4] = False
    expect[1, 1] = True  # pixel 6 = row 1, column 1
    assert (framed == expect).all()
    # A run past the end is clipped; overlapping runs are fine; empty mask decodes to the frame only.
    assert decode_mask([10, 100], shape=(3, 4), border=False).sum() == 2
    assert decode_mask([0, 3, 1, 3], shape=(3, 4), border=False).ravel()[:5].tolist() == [1, 1, 1, 1, 0]
    assert decode_mask([], shape=(3, 4), border=False).sum() == 0


def test_decode_matches_pnp_inversion_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(3):
        pairs = []
        for _ in range(40):
            pairs += [int(rng.integers(0, 512 * 512)), int(rng.integers(0, 3000))]
        pairs += [512 * 512 - 10, 50]  # runs over the end
        assert (decode_mask(pairs) == pnp_mask_decode(pairs).astype(bool)).all()


def test_encode_is_the_inverse_of_decode():
    rng = np.random.default_rng(1)
    m = rng.random((32, 48)) > 0.7
    rle = encode_mask(m)
    assert rle[:2] == [int(np.flatnonzero(m.ravel())[0]), rle[1]]
    assert (decode_mask(rle, shape=m.shape, border=False) == m).all()
    assert encode_mask(np.zeros((4, 4), bool)) == []
    assert encode_mask(np.ones((2, 3), bool)) == [0, 6]


# ------------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("original, blended, expect", [
    ("a slanted [rusty] mountain bicycle on the road", "bicycle bicycle", ("bicycle", "blended_word")),
    ("a [cat] sitting on a wooden chair", "cat dog", ("cat", "blended_word")),
    ("a [cat] sitting on a wooden chair", "", ("cat", "brackets")),
    ("two [red apples] on a plate", "", ("red apples", "brackets")),
    ("a Cat, sitting", "cat tiger", ("cat", "blended_word")),  # case and punctuation insensitive
    ("a [cat] sitting", "cats dogs", ("cat", "brackets")),  # blended word absent from the prompt
    ("a cat sitting on a chair", "", (None, "")),  # an added object: nothing to point at
    ("a cat sitting on a chair", "hat hat", (None, "")),
])
def test_choose_target_word(original, blended, expect):
    assert choose_target_word(original, blended) == expect


def test_strip_brackets_and_types():
    assert strip_brackets("a [red] car [fast]") == "a red car fast"
    assert parse_types("0, 3,9") == (0, 3, 9)
    assert parse_types([9, 1, 1]) == (1, 9)
    assert parse_types(None) is None and parse_types("") is None
    for bad in ("10", "a", "1,,2", "-1"):
        with pytest.raises(InvalidCaseError, match="--types"):
            parse_types(bad)


# ------------------------------------------------------------------------------------------------ entries


@pytest.fixture
def data(tmp_path) -> Path:
    """A two-entry PIE-Bench folder with real 512x512 images."""
    root = tmp_path / "pie"
    (root / "annotation_images" / "1_change_object_80" / "1_artificial" / "1_animal").mkdir(parents=True)
    (root / "annotation_images" / "0_random_140").mkdir(parents=True)
    Image.new("RGB", MASK_SHAPE, (10, 20, 30)).save(root / "annotation_images" / "0_random_140" / "000000000000.jpg")
    Image.new("RGB", MASK_SHAPE, (1, 2, 3)).save(
        root / "annotation_images" / "1_change_object_80" / "1_artificial" / "1_animal" / "111000000000.jpg")
    mapping = {
        "000000000000": {"image_path": "0_random_140/000000000000.jpg", "original_prompt": "a [dog] on grass",
                         "editing_prompt": "a [cat] on grass", "editing_instruction": "make it a cat",
                         "editing_type_id": "0", "blended_word": "dog cat", "mask": [1000, 20, 5000, 7]},
        "111000000000": {"image_path": "1_change_object_80/1_artificial/1_animal/111000000000.jpg",
                         "original_prompt": "a bird on a branch", "editing_prompt": "a bird [with a hat] on a branch",
                         "editing_instruction": "add a hat", "editing_type_id": "1", "blended_word": "",
                         "mask": [0, 10]},
    }
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


def test_read_good_entries(data):
    s = read_piebench(str(data))
    assert s.errors == [] and s.total_entries == 2
    a, b = s.cases
    assert a.id == "000000000000" and a.edit_type == 0 and a.edit_type_name == "random"
    assert a.prompt == "a dog on grass" and a.edit_prompt == "a cat on grass"
    assert a.original_prompt == "a [dog] on grass" and a.instruction == "make it a cat"
    assert (a.target_word, a.target_word_source) == ("dog", "blended_word")
    assert Path(a.image).is_file() and a.image.endswith("annotation_images/0_random_140/000000000000.jpg")
    drawn = a.annotation_mask(border=False)
    assert drawn.shape == MASK_SHAPE and drawn.sum() == 27
    assert a.annotation_mask().sum() == 27 + 4 * 511  # the frame (2044 pixels), runs inside
    assert a.edit_mode("auto") == ("auto", "")
    assert b.target_word is None
    assert b.edit_mode("auto")[0] == "whole" and "no target word" in b.edit_mode("auto")[1]
    assert b.edit_mode("mask") == ("mask", "") and b.edit_mode("whole") == ("whole", "")
    with pytest.raises(InvalidCaseError, match="mode"):
        a.edit_mode("blend")
    assert a.to_dict()["edit_type_name"] == "random" and "rle" not in a.to_dict()
    assert a.to_dict(with_mask=True)["rle"] == [1000, 20, 5000, 7]


def test_types_and_limit(data):
    assert [c.id for c in read_piebench(str(data), types="1").cases] == ["111000000000"]
    assert [c.id for c in read_piebench(str(data), types=[0, 1], limit=1).cases] == ["000000000000"]
    assert read_piebench(str(data), types="5").cases == []
    with pytest.raises(InvalidCaseError, match="--limit"):
        read_piebench(str(data), limit=0)


GOOD = {"image_path": "0_random_140/000000000000.jpg", "original_prompt": "a [dog]", "editing_prompt": "a [cat]",
        "editing_type_id": "0", "blended_word": "dog cat", "mask": [0, 4]}


@pytest.mark.parametrize("change, field", [
    ({"mask": None}, "`mask`"),
    ({"mask": [1, 2, 3]}, "odd number"),
    ({"mask": [1, "2"]}, "integers"),
    ({"mask": [1, 2.5]}, "integers"),
    ({"mask": [-1, 2]}, "negative"),
    ({"mask": [512 * 512, 2]}, "outside"),
    ({"editing_type_id": "10"}, "editing_type_id"),
    ({"editing_type_id": "x"}, "editing_type_id"),
    ({"editing_type_id": None}, "editing_type_id"),
    ({"original_prompt": 5}, "`original_prompt` must be a string"),
    ({"editing_prompt": "a [cat"}, "unbalanced"),
    ({"editing_prompt": "a [[cat]]"}, "nested"),
    ({"original_prompt": " [ ] "}, "`original_prompt` is empty"),
    ({"image_path": "/etc/passwd"}, "image_path"),
    ({"image_path": "../secret.jpg"}, "image_path"),
    ({"image_path": "0_random_140/missing.jpg"}, "does not exist"),
    ({"blended_word": 3}, "`blended_word` must be a string"),
    ({"editing_prompt": None}, "missing"),
])
def test_malformed_entry_names_entry_and_field(data, change, field):
    entry = {**GOOD, **change}
    if change.get("editing_prompt", "") is None:
        del entry["editing_prompt"]
    with pytest.raises(PieBenchEntryError, match=field) as err:
        parse_entry("000000000000", entry, str(data / "annotation_images"))
    assert "'000000000000'" in str(err.value) and err.value.entry_id == "000000000000"


def test_bad_entries_never_stop_the_others(data):
    mapping = json.loads((data / "mapping_file.json").read_text())
    mapping = {"000000000009": {**GOOD, "mask": [1]}, **mapping, "bad/id": GOOD, "000000000008": ["not", "a", "dict"]}
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    s = read_piebench(str(data))
    assert [c.id for c in s.cases] == ["000000000000", "111000000000"]
    assert [e.entry_id for e in s.errors] == ["000000000009", "bad/id", "000000000008"]
    assert "odd number" in s.errors[0].reason and "JSON object" in s.errors[2].reason
    # A malformed entry counts towards --limit (the first N entries are what the user asked for).
    assert len(read_piebench(str(data), limit=2).cases) == 1


def test_unreadable_mapping_file(tmp_path):
    with pytest.raises(InvalidCaseError, match="not a folder"):
        read_piebench(str(tmp_path / "nope"))
    with pytest.raises(InvalidCaseError, match="mapping_file.json does not exist"):
        read_piebench(str(tmp_path))
    (tmp_path / "mapping_file.json").write_text("{not json")
    with pytest.raises(InvalidCaseError, match="not valid JSON"):
        read_piebench(str(tmp_path))
    (tmp_path / "mapping_file.json").write_text("[1, 2]")
    with pytest.raises(InvalidCaseError, match="JSON object keyed by image id"):
        read_piebench(str(tmp_path))


# ------------------------------------------------------------------------------------------------ toy data set


def test_toy_data_set_is_valid_piebench(tmp_path):
    root = build_toy_piebench(tmp_path / "toy", per_type=2)
    s = read_piebench(str(root))
    assert s.errors == [] and len(s.cases) == 2 * len(TOY_TYPES)
    assert sorted({c.edit_type for c in s.cases}) == list(TOY_TYPES)
    for case in s.cases:
        assert len(case.id) == 12 and case.image_path.startswith(f"{case.edit_type}_")
        assert Image.open(case.image).size == MASK_SHAPE[::-1]
        parse_caption(case.prompt)  # the toy grammar: the model's tokenizer knows every word
        parse_caption(case.edit_prompt)
        assert case.prompt != case.edit_prompt
        idx = int(case.id[-3:])
        truth = toy_case(case.edit_type, idx)["mask"]
        assert (case.annotation_mask(border=False) == truth).all()
        if case.edit_type == 2:
            assert case.target_word is None and "[" in case.editing_prompt
        else:
            assert case.target_word and case.prompt.lower().count(case.target_word.lower()) == 1
        if case.edit_type == 8:
            assert case.annotation_mask(border=False).mean() > 0.5  # the background
    # Deterministic: the same seed writes the same files.
    again = build_toy_piebench(tmp_path / "again", per_type=2)
    assert (again / "mapping_file.json").read_text() == (root / "mapping_file.json").read_text()
    assert set(EDIT_TYPES) >= set(TOY_TYPES)
