"""``make demo``: an automatic-mask edit of a bundled example with the default preset, report included."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .edit.run import run_edit
from .edit.settings import EditSettings


def example_dir(name: str = "shapes") -> Path:
    return Path(str(resources.files("editinfinity") / "assets" / "examples" / name))


def run_demo(out_dir="demo_output", *, preset: str | None = None, weights: str | None = None,
             device: str | None = None, progress: bool = True, example: str = "shapes", overwrite: bool = False) -> Path:
    """Edit the bundled example (``a red circle ...`` -> ``a green circle ...``, target word ``circle``)."""
    ex = example_dir(example)
    case = json.loads((ex / "case.json").read_text())
    return run_edit(out_dir, image=str(ex / case["image"]), prompt=case["prompt"], edit_prompt=case["edit_prompt"],
                    mode=case.get("mode", "auto"), target_word=case.get("target_word"), preset=preset,
                    weights=weights, device=device, settings=EditSettings(), overwrite=overwrite, progress=progress)
