"""The edit modes and mask polarities, and the one rule that infers a mode: the single home of these constants
(the CLI, case files, batch cases files, the Python pipeline, the KFP pipelines and the evaluations import them).

No heavy imports here, so command-line parsers and pipeline definitions can use it cheaply.
"""

from __future__ import annotations

#: ``auto``: the mask comes from the target word's attention; ``mask``: a user mask; ``whole``: no mask.
MODES = ("auto", "mask", "whole")
#: ``white-edit`` (default, as diffusers' inpainting) or ``black-edit`` (the reference's mask files).
MASK_POLARITIES = ("white-edit", "black-edit")


def infer_mode(*, mask=None, target_word=None) -> str:
    """The mode of a case that names none: a mask given -> ``mask``; else a target word -> ``auto``; else ``whole``.

    One precedence everywhere. A case giving both a mask and a target word is then refused by validation
    (``CaseSpec.validate``), whichever mode it would infer.
    """
    if mask is not None and str(mask).strip():
        return "mask"
    if target_word is not None and str(target_word).strip():
        return "auto"
    return "whole"
