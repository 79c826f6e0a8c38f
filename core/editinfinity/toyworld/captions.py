"""Captions: the world's fixed grammar (``a {colour} {shape} [and a {colour} {shape}] on a {colour} background``),
its vocabulary, and the parser that reads a caption back."""

from __future__ import annotations

from dataclasses import dataclass

from .scene import COLOURS, KINDS, PALETTE, Scene

# Identical to editinfinity.models.text.STYLE_SUFFIX; repeated so the toy world has no torch/transformers import.
STYLE_SUFFIX = ", the language style of this prompt is"
CAPTION_WORDS: tuple[str, ...] = ("a", "and", "on", "background")
STYLE_WORDS: tuple[str, ...] = tuple(STYLE_SUFFIX.replace(",", " ").split())


def caption(scene: Scene) -> str:
    """``a {colour} {shape} [and a {colour} {shape}] on a {colour} background``, shapes in drawing order."""
    if not scene.shapes:
        raise ValueError("a scene without shapes has no caption")
    objects = " and ".join(f"a {s.colour} {s.kind}" for s in scene.shapes)
    return f"{objects} on a {scene.background} background"


@dataclass(frozen=True)
class CaptionAttributes:
    """What a caption says: background colour and the (colour, kind) of each object, in order."""

    background: str
    objects: tuple[tuple[str, str], ...]

    def describes(self, scene: Scene) -> bool:
        """True when ``scene`` has exactly these attributes in this order."""
        return self.background == scene.background and self.objects == tuple(
            (s.colour, s.kind) for s in scene.shapes
        )


def vocabulary() -> list[str]:
    """Every word the world's captions (and the language-style suffix) use, sorted."""
    return sorted(set(COLOURS) | set(KINDS) | set(CAPTION_WORDS) | set(STYLE_WORDS))


def parse_caption(text: str) -> CaptionAttributes:
    """Inverse of :func:`caption`. Case-insensitive; a trailing ``.`` or language-style suffix is ignored.

    Raises ValueError naming unknown words, or the expected grammar when the words are known but misplaced.
    """
    norm = " ".join(text.strip().lower().split())
    suffix = STYLE_SUFFIX.strip()
    if norm.endswith(suffix):
        norm = norm[: -len(suffix)].rstrip()
    norm = norm.rstrip(".").strip()
    words = norm.split()
    known = set(COLOURS) | set(KINDS) | set(CAPTION_WORDS)
    unknown = [w for w in words if w not in known]
    if unknown:
        raise ValueError(
            f"caption {text!r} has unknown word(s) {unknown}; the toy world knows colours {list(COLOURS)}, "
            f"shapes {list(KINDS)} and {list(CAPTION_WORDS)}"
        )
    grammar = "'a {colour} {shape} [and a {colour} {shape}] on a {colour} background'"
    objects: list[tuple[str, str]] = []
    pos = 0
    while True:
        chunk = words[pos : pos + 3]
        if len(chunk) != 3 or chunk[0] != "a" or chunk[1] not in PALETTE or chunk[2] not in KINDS:
            raise ValueError(f"caption {text!r} does not follow {grammar}")
        objects.append((chunk[1], chunk[2]))
        pos += 3
        if pos < len(words) and words[pos] == "and":
            pos += 1
            continue
        break
    tail = words[pos:]
    if (
        len(tail) != 4
        or tail[0] != "on"
        or tail[1] != "a"
        or tail[2] not in PALETTE
        or tail[3] != "background"
    ):
        raise ValueError(f"caption {text!r} does not follow {grammar}")
    if len(objects) > 2:
        raise ValueError(f"caption {text!r} names {len(objects)} objects; the world has 1 or 2")
    return CaptionAttributes(background=tail[2], objects=tuple(objects))
