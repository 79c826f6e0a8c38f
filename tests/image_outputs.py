"""Checks of what an edit run inside a container left on the host (``images/test.sh``, ``make image-test``).

``python tests/image_outputs.py DIR MODE [--prompt-file CASE]``: DIR is an edit's result folder (``editinfinity
demo``/``edit`` output, or a pipeline's ``output_uri``). Fails (exit 1, one line per problem) when a file the mode
must produce is missing or unreadable, when a picture has the wrong size, or when ``summary.json`` does not
describe this case with finite metrics. Whether the edit *looks* right (the target colour present) depends on the
model and the CPU's arithmetic, so it is printed, not asserted: the image test proves the packaging, the toy
evaluation (bench/) measures the quality.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from PIL import Image

COMMON = ("edited.png", "reconstruction.png", "before_after.png", "report.html", "summary.json")
BY_MODE = {"auto": ("mask.png", "weights.png", "attention.png"), "mask": ("mask.png", "weights.png"), "whole": ()}
ABSENT = {"auto": (), "mask": ("attention.png",), "whole": ("mask.png", "attention.png")}


def problems(out: Path, mode: str, case: dict | None = None) -> list[str]:
    """Everything wrong with the result folder ``out`` of a ``mode`` edit (empty: fine)."""
    if not out.is_dir():
        return [f"{out}: no result folder"]
    found = []
    for name in COMMON + BY_MODE[mode]:
        if not (out / name).is_file() or (out / name).stat().st_size == 0:
            found.append(f"{out}/{name}: missing or empty")
    for name in ABSENT[mode]:
        if (out / name).exists():
            found.append(f"{out}/{name}: present, but mode {mode} makes none")
    if found:
        return found
    summary = json.loads((out / "summary.json").read_text())
    spec = summary.get("spec", {})
    if spec.get("mode") != mode:
        found.append(f"summary.json: mode {spec.get('mode')!r}, expected {mode!r}")
    for key in ("prompt", "edit_prompt", "target_word"):
        if case and case.get(key) and spec.get(key) != case[key]:
            found.append(f"summary.json: {key} {spec.get(key)!r}, expected {case[key]!r}")
    height, width = summary.get("image_size", (0, 0))
    for name in ("edited.png", "reconstruction.png") + tuple(n for n in BY_MODE[mode] if n.endswith(".png")):
        with Image.open(out / name) as im:
            im.load()
            if name in ("edited.png", "reconstruction.png") and im.size != (width, height):
                found.append(f"{name}: {im.size[0]}x{im.size[1]}, summary.json says {width}x{height}")
    metrics = summary.get("metrics") or {}
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numbers:
        found.append("summary.json: no metrics")
    found += [f"summary.json: metric {k} = {v}" for k, v in numbers.items() if not math.isfinite(v)]
    if "<html" not in (out / "report.html").read_text(errors="replace").lower():
        found.append("report.html: not an HTML page")
    return found


def describe(out: Path) -> str:
    """One line: the metrics and which colours the edited picture shows (toy scenes only; informational)."""
    summary = json.loads((out / "summary.json").read_text())
    metrics = {k: round(v, 2) for k, v in (summary.get("metrics") or {}).items() if isinstance(v, float)}
    try:
        from editinfinity import toyworld

        objects = toyworld.analyse(Image.open(out / "edited.png"))["objects"]
        shapes = ", ".join(f"{o['colour']} {o['kind']}" for o in objects)
    except Exception as exc:  # not a toy scene, or the analysis failed: only this description is lost
        shapes = f"(not analysed: {exc.__class__.__name__})"
    return f"{out}: metrics {metrics}; edited picture shows: {shapes}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("mode", choices=sorted(BY_MODE))
    ap.add_argument("--case", type=Path, default=None, help="case.json whose prompts the summary must carry")
    args = ap.parse_args(argv)
    case = json.loads(args.case.read_text()) if args.case else None
    found = problems(args.out, args.mode, case)
    for line in found:
        print(f"image-test: {line}", file=sys.stderr)
    if not found:
        print(describe(args.out))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
