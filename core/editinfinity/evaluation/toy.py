"""A small PIE-Bench-format data set made from the toy world (tests, examples, the committed toy table).

Same files as PIE-Bench: ``mapping_file.json`` (prompts with the changed words in ``[ ]``, ``blended_word``,
run-length ``mask`` over 512x512, ``editing_type_id``) and ``annotation_images/<type folder>/<id>.png`` (PNG, not
JPEG: the toy world's flat colours would pick up compression artefacts). The toy world has colours and three
shapes, so six of PIE-Bench's ten edit types make sense in it:

* 0 random: a colour or shape change (``toyworld.make_edit_case``);
* 1 change object: a shape change (circle -> square), ``blended_word`` "circle square";
* 2 add object: a second shape appears, ``"a red circle [and a blue square] on ..."``, no blended word;
* 3 delete object: the top shape disappears, the source prompt brackets it;
* 6 change color: a shape's colour, ``"a [red] circle"`` -> ``"a [green] circle"``, ``blended_word`` "circle circle";
* 8 change background: the background colour, the mask is everything outside the shapes.

Content (4), pose (5), material (7) and style (9) have no meaning in a world of flat shapes and are left out.
Every case is a pure function of ``(seed, type, index)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..toyworld import (
    COLOURS,
    Scene,
    caption,
    make_edit_case,
    render,
    render_mask,
    sample_scene,
    scene_problems,
)
from .piebench import EDIT_TYPES, IMAGES_DIR, MAPPING_FILE, MASK_SHAPE, encode_mask

#: The edit types the toy world can express.
TOY_TYPES: tuple[int, ...] = (0, 1, 2, 3, 6, 8)


def _bracket(prompt: str, words: str) -> str:
    """``prompt`` with the first whole-word occurrence of ``words`` put in brackets."""
    padded = f" {prompt} "
    i = padded.index(f" {words} ")
    return (padded[: i + 1] + f"[{words}]" + padded[i + 1 + len(words):]).strip()


def _attribute_case(seed: int, attribute: str | None) -> dict[str, Any]:
    case = make_edit_case(seed, *MASK_SHAPE[::-1], attribute=attribute)
    src_shape = case["source_scene"].shapes[case["index"]]
    dst_shape = case["edited_scene"].shapes[case["index"]]
    old_phrase, new_phrase = f"{src_shape.colour} {src_shape.kind}", f"{dst_shape.colour} {dst_shape.kind}"
    old_word, new_word = case["old_value"], case["new_value"]
    # Bracket the changed word inside the object's phrase, so that it is the right object's word.
    prompt = case["prompt"].replace(old_phrase, _bracket(old_phrase, old_word), 1)
    edit_prompt = case["edit_prompt"].replace(new_phrase, _bracket(new_phrase, new_word), 1)
    # Prompt-to-Prompt's blend words name the edited object in both prompts; make_edit_case's target word occurs
    # once in the source prompt, so it points at the right object.
    target = case["target_word"]
    blended = f"{target} {new_word if target == old_word else target}"
    instruction = f"change the {old_phrase} to {new_phrase}"
    return {"source": case["source_scene"], "prompt": prompt, "edit_prompt": edit_prompt, "blended": blended,
            "instruction": instruction, "mask": case["mask"]}


def _two_shape_scene(gen: np.random.Generator) -> Scene:
    for _ in range(1000):
        scene = sample_scene(gen, *MASK_SHAPE[::-1], n_shapes=2)
        if not scene_problems(Scene(scene.background, scene.shapes[:1], scene.width, scene.height)):
            return scene
    raise RuntimeError("no two-shape toy scene found")


def _add_or_delete(seed: int, add: bool) -> dict[str, Any]:
    both = _two_shape_scene(np.random.default_rng([seed, 0xADD]))
    one = Scene(both.background, both.shapes[:1], both.width, both.height)
    top = both.shapes[1]
    extra = f"and a {top.colour} {top.kind}"
    full = caption(both)
    bracketed = full.replace(extra, f"[{extra}]", 1)
    mask = render_mask(both, 1)
    if add:
        return {"source": one, "prompt": caption(one), "edit_prompt": bracketed, "blended": "",
                "instruction": f"add a {top.colour} {top.kind}", "mask": mask}
    return {"source": both, "prompt": bracketed, "edit_prompt": caption(one), "blended": "",
            "instruction": f"remove the {top.colour} {top.kind}", "mask": mask}


def _background(seed: int) -> dict[str, Any]:
    gen = np.random.default_rng([seed, 0xB6])
    scene = sample_scene(gen, *MASK_SHAPE[::-1])
    used = {scene.background, *(s.colour for s in scene.shapes)}
    options = [c for c in COLOURS if c not in used]
    new = options[int(gen.integers(len(options)))]
    edited = Scene(new, scene.shapes, scene.width, scene.height)
    shapes = np.zeros(MASK_SHAPE, dtype=bool)
    for i in range(len(scene.shapes)):
        shapes |= render_mask(scene, i)
    bg_old, bg_new = f"a {scene.background} background", f"a {new} background"
    return {"source": scene,
            "prompt": caption(scene).replace(bg_old, f"a [{scene.background}] background"),
            "edit_prompt": caption(edited).replace(bg_new, f"a [{new}] background"),
            "blended": "background background", "instruction": f"make the background {new}", "mask": ~shapes}


def toy_case(edit_type: int, index: int, seed: int = 0) -> dict[str, Any]:
    """One toy entry: ``source`` scene, bracketed ``prompt``/``edit_prompt``, ``blended``, ``instruction``, ``mask``."""
    s = seed * 1_000_003 + edit_type * 10_007 + index
    if edit_type == 0:
        return _attribute_case(s, None)
    if edit_type == 1:
        return _attribute_case(s, "kind")
    if edit_type == 6:
        return _attribute_case(s, "colour")
    if edit_type in (2, 3):
        return _add_or_delete(s, add=edit_type == 2)
    if edit_type == 8:
        return _background(s)
    raise ValueError(f"edit type {edit_type} ({EDIT_TYPES.get(edit_type)}) has no toy-world version; "
                     f"choose from {TOY_TYPES}")


def type_folder(edit_type: int, count: int) -> str:
    """PIE-Bench's folder name of an edit type, e.g. ``1_change_object_80``."""
    return f"{edit_type}_{EDIT_TYPES[edit_type].replace(' ', '_')}_{count}"


def build_toy_piebench(out_dir: str | Path, *, per_type: int = 2, types: Iterable[int] = TOY_TYPES,
                       seed: int = 0) -> Path:
    """Write a toy PIE-Bench folder (``mapping_file.json`` + ``annotation_images/``) and return its path.

    Ids are 12 digits like PIE-Bench's: the type digit, then zeros, then the index. Entries are ordered by index,
    then type, so that ``--limit N`` takes cases of every type.
    """
    root = Path(out_dir)
    types = tuple(types)
    mapping: dict[str, dict[str, Any]] = {}
    for t in types:
        (root / IMAGES_DIR / type_folder(t, per_type)).mkdir(parents=True, exist_ok=True)
    for i in range(per_type):
        for t in types:
            folder = type_folder(t, per_type)
            case = toy_case(t, i, seed)
            entry_id = f"{t}{i:011d}"
            rel = f"{folder}/{entry_id}.png"
            render(case["source"]).save(root / IMAGES_DIR / rel)
            mapping[entry_id] = {
                "image_path": rel, "original_prompt": case["prompt"], "editing_prompt": case["edit_prompt"],
                "editing_instruction": case["instruction"], "editing_type_id": str(t),
                "blended_word": case["blended"], "mask": encode_mask(case["mask"]),
            }
    (root / MAPPING_FILE).write_text(json.dumps(mapping, indent=1) + "\n")
    return root
