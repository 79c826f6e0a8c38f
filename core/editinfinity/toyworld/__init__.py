"""The toy world: a seedable renderer, captions, edits and a model-free judge for flat-coloured shapes.

Official Infinity weights cannot be downloaded here, so the toy preset is trained on this synthetic world and
the CPU demo edits its pictures. A scene is a flat background of one palette colour with one or two flat shapes
(`circle`, `square`, `triangle`), each 20-45 % of the image width and fully inside the image; the second shape is
drawn on top of the first. Captions follow a fixed grammar, so they can be parsed back, and the analyser judges
pixels (rendered, VAE-reconstructed or generated) without any model.

Modules: ``scene`` (palette, :class:`Shape`, :class:`Scene`, a shape's geometry), ``render`` (masks and
pictures), ``captions`` (grammar, vocabulary, parser), ``sampling`` (layout rules, random scenes, edit cases),
``analysis`` (the judge) and ``tokenizer`` (the toy T5 tokenizer and text-encoder configuration). Every name
callers use is importable from ``editinfinity.toyworld`` itself.
"""

from .analysis import analyse, attribute_present, label_components, matches, quantise
from .captions import CAPTION_WORDS, STYLE_SUFFIX, CaptionAttributes, caption, parse_caption, vocabulary
from .render import render, render_mask, shape_mask
from .sampling import edit_scene, is_valid_scene, make_edit_case, sample_scene, scene_problems
from .scene import COLOURS, DEFAULT_NOISE, KINDS, PALETTE, Scene, Shape
from .tokenizer import build_tokenizer, tiny_t5_config

__all__ = [
    "CAPTION_WORDS",
    "COLOURS",
    "DEFAULT_NOISE",
    "KINDS",
    "PALETTE",
    "STYLE_SUFFIX",
    "CaptionAttributes",
    "Scene",
    "Shape",
    "analyse",
    "attribute_present",
    "build_tokenizer",
    "caption",
    "edit_scene",
    "is_valid_scene",
    "label_components",
    "make_edit_case",
    "matches",
    "parse_caption",
    "quantise",
    "render",
    "render_mask",
    "sample_scene",
    "scene_problems",
    "shape_mask",
    "tiny_t5_config",
    "vocabulary",
]
