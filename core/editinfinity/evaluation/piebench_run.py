"""Run EditInfinity over PIE-Bench and score it: one model load, resumable, a bad case never stops the others.

Output folder layout::

    OUT/bench.json                  the run's configuration (a resumed run must use the same one)
    OUT/cases/<id>/edit/            run_edit's output (edited.png, report.html, summary.json, stages/)
    OUT/cases/<id>/case.json        the case as read from the mapping file, the mode used, seconds
    OUT/cases/<id>/published_512.png   the method's output as published (the decode of the blended codes), 512x512
    OUT/cases/<id>/kept_512.png     the same edit with the source's pixels kept where the keep weight is 1
    OUT/cases/<id>/edited_512.png   the edit as configured (one of the two), 512x512: written last, marks the case done
    OUT/cases/<id>/error.json       why the case failed (removed when it succeeds later)
    OUT/cases/<id>/scores.json      its metrics, with the metric weights they were computed with
    OUT/results.csv, table.md, table.html, grids/type_<k>.png, summary.json

A case whose ``edited_512.png`` exists is not edited again; failed and interrupted cases are retried by the next
run. Interrupting (Ctrl-C) leaves no partial file under a final name (run_edit is atomic; every file here is
written to a temporary name and renamed).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..edit.settings import EditSettings
from ..errors import EditInfinityError, InvalidCaseError
from ..scratch import scratch_dir
from ..storage.uri import has_scheme
from .piebench import EDIT_TYPES, MASK_SHAPE, MODES, PieBenchCase, PieBenchSet, read_piebench
from .piebench_metrics import MetricModels, score_case
from .piebench_report import (
    CaseRow,
    aggregate,
    computed_columns,
    save_png,
    table_html,
    table_markdown,
    type_grid,
    write_csv,
)

log = logging.getLogger(__name__)

RUN_FILE = "bench.json"
CASES_DIR = "cases"
EDIT_DIR = "edit"
CASE_FILE = "case.json"
EDITED_FILE = "edited_512.png"
#: Both outputs of every case (tables report a row for each): the published method's decode, and kept pixels.
VARIANT_FILES = {"published": "published_512.png", "kept": "kept_512.png"}
VARIANT_LABELS = {"published": "All, method as published", "kept": "All, with kept pixels"}
ERROR_FILE = "error.json"
SCORES_FILE = "scores.json"
#: How an edit is brought to the evaluation size (EditInfinity's outputs are 1024x1024 at 1M).
RESAMPLE = "PIL Lanczos"

EditFn = Callable[..., Any]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


@dataclass
class BenchConfig:
    """What makes two runs' edits comparable; a resumed run must match the folder's ``bench.json``."""

    mode: str
    preset: str
    weights: str | None
    resolution: str | None
    settings: EditSettings

    def to_dict(self) -> dict:
        # the settings as used (an unset threshold: the preset's), so a resumed run compares what its edits use
        return {"mode": self.mode, "preset": self.preset, "weights": self.weights, "resolution": self.resolution,
                "settings": self.settings.effective_dict(self.preset)}


#: Settings that change speed or memory, not the edits; a resumed run may change them.
SPEED_ONLY = frozenset({"checkpointing", "low_memory", "compile"})


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """What differs between two configurations; keys the old record lacks (settings added by a later version)
    and speed-only settings are not differences."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old) if k in new and k not in SPEED_ONLY
                for d in _differences(old[k], new[k], f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} ({old!r} -> {new!r})"]


def check_run_config(out_dir: Path, config: BenchConfig) -> None:
    """Write ``bench.json``, or check that an existing one has the same configuration (InvalidCaseError)."""
    path = out_dir / RUN_FILE
    new = config.to_dict()
    if path.is_file():
        old = json.loads(path.read_text()).get("config", {})
        diffs = _differences(old, new)
        if diffs:
            raise InvalidCaseError(f"{out_dir} holds a PIE-Bench run made with other settings ({'; '.join(diffs)}); "
                                   "resume it with the same options or choose another --out")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"config": new, "editinfinity_version": __version__})


def case_done(case_dir: Path) -> bool:
    """True when the case's edit is complete (its 512x512 edit and record exist)."""
    return (case_dir / EDITED_FILE).is_file() and (case_dir / CASE_FILE).is_file()


def to_eval_size(image: Image.Image, size: tuple[int, int] = MASK_SHAPE) -> Image.Image:
    """The edit at the evaluation size ``(H, W)`` (Lanczos; a no-op when it already has it)."""
    image = image.convert("RGB")
    if (image.height, image.width) == tuple(size):
        return image
    return image.resize((size[1], size[0]), resample=Image.LANCZOS)


def edit_one(case: PieBenchCase, case_dir: Path, config: BenchConfig, *, models: Any,
             edit_fn: EditFn | None = None, progress: bool = False) -> dict:
    """Edit one case into ``case_dir`` (see the module docstring); returns its ``case.json`` record."""
    from ..edit.run import run_edit

    edit_fn = edit_fn or run_edit
    mode, note = case.edit_mode(config.mode)
    case_dir.mkdir(parents=True, exist_ok=True)
    edit_dir = case_dir / EDIT_DIR
    with scratch_dir("mask", dir=case_dir) as tmp:
        mask_path = None
        if mode == "mask":
            drawn = case.annotation_mask(border=False)
            if not drawn.any():
                raise InvalidCaseError(f"PIE-Bench entry {case.id!r}: the annotation mask is empty, nothing to edit "
                                       "in mode mask")
            mask_path = str(Path(tmp) / "mask.png")
            Image.fromarray(drawn.astype(np.uint8) * 255).save(mask_path)
        if not (edit_dir / "edited.png").is_file():  # run_edit's folder appears only when complete
            edit_fn(edit_dir, image=case.image, prompt=case.prompt, edit_prompt=case.edit_prompt, mode=mode,
                    target_word=case.target_word if mode == "auto" else None, mask=mask_path,
                    mask_polarity="white-edit", resolution=config.resolution, preset=config.preset,
                    weights=config.weights, models=models, settings=config.settings, overwrite=True,
                    progress=progress)
    seconds = None
    summary = edit_dir / "summary.json"
    if summary.is_file():
        seconds = json.loads(summary.read_text()).get("seconds", {}).get("total")
    record = {**case.to_dict(), "mode": mode, "note": note, "seconds": seconds, "config": config.to_dict(),
              "resample": RESAMPLE, "editinfinity_version": __version__}
    _write_json(case_dir / CASE_FILE, record)
    for name, picture in output_variants(edit_dir).items():
        save_png(to_eval_size(picture), case_dir / VARIANT_FILES[name])
    edited = to_eval_size(Image.open(edit_dir / "edited.png"))
    save_png(edited, case_dir / EDITED_FILE)  # last: marks the case done
    (case_dir / ERROR_FILE).unlink(missing_ok=True)
    return record


def output_variants(edit_dir: Path) -> dict[str, Image.Image]:
    """The published output (``stages/generate/decoded.png``) and the kept-pixels output of a finished edit.

    The kept-pixels picture is ``edited.png`` when the edit ran with kept pixels, else it is made here from the
    decode, ``source.png`` and the keep weights the edit blended with (``edit.pixels``; the mask stage's, or the
    generate stage's when ``band="auto"`` kept one band); without a mask (whole image) both
    are the decode. An edit folder without the stage files (an older version) gives its ``edited.png`` for both.
    """
    from ..edit.masking import WEIGHTS_FILE, used_weights_dir
    from ..edit.pixels import keep_source_pixels

    edited = Image.open(edit_dir / "edited.png").convert("RGB")
    decoded_path = edit_dir / "stages" / "generate" / "decoded.png"
    if not decoded_path.is_file():
        return {"published": edited, "kept": edited}
    decoded = Image.open(decoded_path).convert("RGB")
    record = json.loads((edit_dir / "stages" / "generate" / "stage.json").read_text())
    weights_path = used_weights_dir(edit_dir / "stages" / "mask", edit_dir / "stages" / "generate", record) / WEIGHTS_FILE
    if record.get("keep_pixels") or not weights_path.is_file():
        return {"published": decoded, "kept": edited}
    from safetensors.torch import load_file

    source = Image.open(edit_dir / "stages" / "generate" / "source.png").convert("RGB")
    return {"published": decoded, "kept": keep_source_pixels(source, decoded, load_file(str(weights_path))["weights"])}


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, EditInfinityError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def load_pair(case: PieBenchCase, case_dir: Path) -> tuple[Image.Image, Image.Image]:
    """(source, edit) at the evaluation size; InvalidCaseError when the source is not 512x512."""
    source = Image.open(case.image).convert("RGB") if not has_scheme(case.image) else _open_uri(case.image)
    if (source.height, source.width) != MASK_SHAPE:
        raise InvalidCaseError(f"PIE-Bench entry {case.id!r}: source {case.image} is {source.width}x{source.height} "
                               f"px; PIE-Bench scores pictures of {MASK_SHAPE[1]}x{MASK_SHAPE[0]}")
    return source, Image.open(case_dir / EDITED_FILE).convert("RGB")


def _open_uri(uri: str) -> Image.Image:
    import io

    from .. import storage

    return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")


def _floats(scores: dict) -> dict[str, float | None]:
    return {k: (None if v is None else float(v)) for k, v in scores.items()}


def score_one(case: PieBenchCase, case_dir: Path, models: MetricModels,
              variants: dict | None = None) -> dict[str, float | None]:
    """The case's metrics, from ``scores.json`` when it was computed with the same metric weights.

    ``variants``, when given, receives the metrics of each output variant present (``VARIANT_FILES``)."""
    path = case_dir / SCORES_FILE
    describe = models.describe()
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("models") == describe and cached.get("editinfinity_version") == __version__:
            if variants is not None:
                variants.update({k: _floats(v) for k, v in cached.get("variants", {}).items()})
            return _floats(cached["scores"])
    mask = case.annotation_mask(border=True)
    source, edited = load_pair(case, case_dir)
    scores = score_case(source, edited, mask, case.edit_prompt, models)
    found = {name: _floats(score_case(source, Image.open(case_dir / file).convert("RGB"), mask, case.edit_prompt,
                                      models))
             for name, file in VARIANT_FILES.items() if (case_dir / file).is_file()}
    if variants is not None:
        variants.update(found)
    _write_json(path, {"scores": _floats(scores), "variants": found, "models": describe,
                       "editinfinity_version": __version__})
    return scores


@dataclass
class BenchResult:
    """What a run did and where its outputs are."""

    out_dir: Path
    rows: list[CaseRow]
    edited: int = 0
    resumed: int = 0
    failed: int = 0
    invalid_entries: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return sum(r.status == "ok" for r in self.rows)


def _header(config: BenchConfig, data: PieBenchSet, result: BenchResult, describe: dict, *,
            types: Iterable[int] | None, limit: int | None, device: str | None) -> list[str]:
    s = config.settings
    selection = ", ".join(f"--{k} {v}" for k, v in (("types", ",".join(map(str, types)) if types else None),
                                                    ("limit", limit)) if v)
    weights = {"clip": "CLIP", "dino": "DINO", "lpips": "LPIPS"}
    models = "; ".join(f"{label} `{describe[k]}`" if describe.get(k) else f"{label} not computed (no weights)"
                       for k, label in weights.items())
    return [
        f"- Settings: preset `{config.preset}`{f' (weights `{config.weights}`)' if config.weights else ''}, mode "
        f"`{config.mode}`, resolution {config.resolution or 'the preset default'}, profile {s.profile}, "
        f"prompt tuning {s.prompt_iters} updates, LoRA {s.lora_iters} updates, mask threshold "
        f"{s.mask_threshold(config.preset)}{'' if s.threshold is not None else ' (the preset default)'}, "
        f"seed {s.seed}, device {device or 'auto'}; editinfinity {__version__}.",
        f"- Data: `{data.root}`: {len(data.cases) + len(data.errors)} of {data.total_entries} entries"
        f"{f' ({selection})' if selection else ''}; {result.ok} scored, {result.failed} failed, "
        f"{result.invalid_entries} malformed.",
        f"- Protocol: PnP-Inversion's evaluation: 512x512, edits resized with {RESAMPLE}; background = outside "
        "the annotation mask with its 1-px frame, both images zeroed there (PSNR/MSE/SSIM/LPIPS); SSIM as "
        "torchmetrics < 1.5; LPIPS SqueezeNet; CLIP score of the edit prompt; DINO ViT key self-similarity.",
        f"- Metric weights: {models}.",
        f"- Outputs: the rows by edit type and `All` score the edit as configured (kept pixels "
        f"{'on' if s.keep_pixels else 'off'}); `{VARIANT_LABELS['published']}` scores the decode of the blended "
        f"codes (the published method's output), `{VARIANT_LABELS['kept']}` the same edit with the source's pixels "
        "kept where the keep weight is 1 (docs/method.md, Kept pixels).",
    ]


def _grids(out_dir: Path, data: PieBenchSet, rows: list[CaseRow], *, per_type: int) -> dict[int, str]:
    grid_dir = out_dir / "grids"
    grid_dir.mkdir(exist_ok=True)
    by_id = data.by_id()
    names: dict[int, str] = {}
    for t in sorted({r.edit_type for r in rows if r.edit_type is not None}):
        pairs = []
        for r in rows:
            if r.edit_type != t or r.status != "ok" or len(pairs) >= per_type:
                continue
            case_dir = out_dir / CASES_DIR / r.id
            try:
                source, edited = load_pair(by_id[r.id], case_dir)
            except (OSError, EditInfinityError):
                continue
            pairs.append((r.id, source, edited))
        name = f"type_{t}.png"
        save_png(type_grid(f"{t} {EDIT_TYPES[t]}: source | edited", pairs), grid_dir / name)
        names[t] = f"grids/{name}"
    return names


def run_piebench(data_dir: str, out_dir: str | os.PathLike, *, mode: str = "auto",
                 types: str | Iterable[int] | None = None, limit: int | None = None, preset: str | None = None,
                 weights: str | None = None, device: str | None = None, resolution: str | None = None,
                 settings: EditSettings | None = None, models: Any = None,
                 metric_models: MetricModels | None = None, edit: bool = True, edit_fn: EditFn | None = None,
                 grid_cases: int = 12, progress: bool = True) -> BenchResult:
    """Edit every selected PIE-Bench case (resuming), score all finished ones and write the tables.

    Args:
        data_dir: the PIE-Bench folder (``mapping_file.json`` + ``annotation_images/``).
        out_dir: output folder (layout in the module docstring); reusing it resumes the run.
        mode: ``auto`` (attention mask from the target word; whole image when the entry has none), ``mask`` (the
            annotation mask, as drawn) or ``whole``.
        types, limit: keep only these edit types / the first ``limit`` selected entries.
        preset, weights, device, resolution, settings: as for ``run_edit``; models are loaded once (or pass
            ``models``), and only when some case still needs an edit.
        metric_models: CLIP / DINO / LPIPS scorers (None: those columns are not computed).
        edit: False scores what is there without editing anything.
        edit_fn: the per-case edit function (default ``editinfinity.edit.run.run_edit``; tests swap it).
        grid_cases: at most this many cases per edit-type thumbnail grid.
        progress: a progress bar over cases.
    """
    from ..models.presets import default_preset_name

    if mode not in MODES:
        raise InvalidCaseError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    out = Path(out_dir)
    settings = settings or EditSettings()
    settings.validate()
    config = BenchConfig(mode=mode, preset=preset or default_preset_name(), weights=weights, resolution=resolution,
                         settings=settings)
    data = read_piebench(data_dir, types=types, limit=limit)
    check_run_config(out, config)
    metric_models = metric_models or MetricModels()
    result = BenchResult(out_dir=out, rows=[], invalid_entries=len(data.errors))
    cases_root = out / CASES_DIR

    todo = [c for c in data.cases if not case_done(cases_root / c.id)] if edit else []
    result.resumed = len(data.cases) - len(todo) if edit else 0
    if todo and models is None and edit_fn is None:
        from ..models.bundle import load_models

        models = load_models(config.preset, weights=weights, device=device, bias_mode=settings.bias_mode)
    failures: dict[str, str] = {}
    iterator: Iterable[PieBenchCase] = todo
    if progress and todo:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc="PIE-Bench edits", unit="case")
    for case in iterator:
        case_dir = cases_root / case.id
        start = time.perf_counter()
        try:
            edit_one(case, case_dir, config, models=models, edit_fn=edit_fn)
            result.edited += 1
            log.info("case %s edited in %.1f s", case.id, time.perf_counter() - start)
        except Exception as exc:  # a bad case never stops the others; Ctrl-C (BaseException) does
            failures[case.id] = _error_text(exc)
            log.warning("case %s failed: %s", case.id, failures[case.id])
            log.debug("%s", traceback.format_exc())
            case_dir.mkdir(parents=True, exist_ok=True)
            _write_json(case_dir / ERROR_FILE, {"error": failures[case.id], "type": type(exc).__name__,
                                                "config": config.to_dict()})

    for case in data.cases:
        case_dir = cases_root / case.id
        mode_used, note = case.edit_mode(mode)
        row = CaseRow(id=case.id, edit_type=case.edit_type, status="not run", mode=mode_used,
                      target_word=(case.target_word or "") if mode_used == "auto" else "", note=note,
                      image_path=case.image_path, edit_prompt=case.edit_prompt)
        if case.id in failures:
            row.status, row.error = "failed", failures[case.id]
        elif case_done(case_dir):
            record = json.loads((case_dir / CASE_FILE).read_text())
            row.seconds = record.get("seconds")
            try:
                row.scores = score_one(case, case_dir, metric_models, variants=row.variant_scores)
                row.status = "ok"
            except (EditInfinityError, OSError, ValueError) as exc:
                row.status, row.error = "failed", f"scoring: {_error_text(exc)}"
        elif (case_dir / ERROR_FILE).is_file():
            row.status = "failed"
            row.error = json.loads((case_dir / ERROR_FILE).read_text()).get("error", "")
        result.rows.append(row)
    for err in data.errors:
        result.rows.append(CaseRow(id=err.entry_id, edit_type=None, status="invalid entry", error=err.reason))
    result.failed = sum(r.status == "failed" for r in result.rows)
    write_outputs(out, data, result, config, metric_models.describe(), types=types, limit=limit, device=device,
                  grid_cases=grid_cases)
    return result


def write_outputs(out: Path, data: PieBenchSet, result: BenchResult, config: BenchConfig, describe: dict, *,
                  types: Any, limit: int | None, device: str | None, grid_cases: int = 12) -> None:
    """``results.csv``, ``table.md``, ``table.html``, ``grids/`` and ``summary.json`` for ``result``."""
    from .piebench import parse_types

    computed = computed_columns(describe)
    table = aggregate(result.rows, variants=VARIANT_LABELS)
    header = _header(config, data, result, describe, types=parse_types(types), limit=limit, device=device)
    grids = _grids(out, data, result.rows, per_type=grid_cases)
    files = {"csv": out / "results.csv", "markdown": out / "table.md", "html": out / "table.html",
             "summary": out / "summary.json"}
    write_csv(files["csv"], result.rows, computed)
    files["markdown"].write_text(table_markdown(table, computed, header), encoding="utf-8")
    files["html"].write_text(table_html(table, computed, header, grids), encoding="utf-8")
    _write_json(files["summary"], {
        "config": config.to_dict(), "data": data.root, "entries": data.total_entries,
        "selected": len(data.cases) + len(data.errors), "scored": result.ok, "failed": result.failed,
        "invalid_entries": result.invalid_entries, "edited_now": result.edited, "resumed": result.resumed,
        "metric_weights": describe, "resample": RESAMPLE,
        "table": [{"edit_type": row.label, "cases": row.cases, "scored": row.scored, "means": row.means}
                  for row in table],
        "editinfinity_version": __version__})
    result.files = {**files, **{f"grid_{t}": out / name for t, name in grids.items()}}
