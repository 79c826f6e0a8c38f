"""The PIE-Bench run as three steps over URIs: list the cases, edit one, score them all (what the ``piebench``
pipeline's pods run, one step per component; plain library code, no kfp).

Everything goes through URIs (local paths, ``gs://``, ``s3://``): the PIE-Bench folder ``data_uri`` and the
results root ``output_uri``, which has the CLI's layout (``bench.json``, ``cases/<id>/...``, ``results.csv``,
``table.md``, ``table.html``, ``grids/``), so a pipeline run and ``editinfinity eval piebench`` resume each other's
work. A case whose ``cases/<id>/edited_512.png`` exists is not edited again (uploaded last, it marks the case
done); a case that fails records ``cases/<id>/error.json`` and returns a "failed" result instead of failing the
task, so one bad case never stops the fan-out or the scoring step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..edit.settings import EditSettings
from ..errors import InvalidCaseError
from ..scratch import make_scratch, scratch_dir
from ..storage.uri import has_scheme, join_uri
from .piebench import IMAGES_DIR, MAPPING_FILE, parse_entry, read_piebench
from .piebench_run import (
    CASE_FILE,
    CASES_DIR,
    EDITED_FILE,
    ERROR_FILE,
    RUN_FILE,
    SCORES_FILE,
    BenchConfig,
    _differences,
    _error_text,
    edit_one,
)

log = logging.getLogger(__name__)


def bench_config(*, mode: str, preset: str, weights: str, resolution: str, prompt_iters: int, lora_iters: int,
                 seed: int, threshold: float | None = None) -> BenchConfig:
    """The run configuration from pipeline parameters ("" = default; ``threshold`` negative or None: the preset's,
    ``runtime.mask_threshold``)."""
    from ..models.presets import default_preset_name
    from ..runtime import mask_threshold

    settings = EditSettings.from_profile("default", prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed,
                                         threshold=mask_threshold(threshold))
    return BenchConfig(mode=mode, preset=preset or default_preset_name(), weights=weights or None,
                       resolution=resolution or None, settings=settings)


def list_cases(data_uri: str, output_uri: str, config: BenchConfig, *, types: str = "", limit: int = 0) -> list:
    """The selected, well-formed cases as ``[{"id", "edit_type"}]`` (the ParallelFor items); writes
    ``<output_uri>/bench.json`` or checks that an existing one has the same configuration."""
    from .. import storage

    if not output_uri:
        raise InvalidCaseError("the piebench pipeline needs output_uri (where the edits and the table go)")
    data = read_piebench(data_uri, types=types or None, limit=limit or None, check_images=not has_scheme(data_uri))
    for err in data.errors:
        log.warning("%s", err)
    if not data.cases:
        raise InvalidCaseError(f"no well-formed PIE-Bench case selected in {data_uri} (types={types!r}, "
                               f"limit={limit}); {len(data.errors)} malformed")
    run_file = join_uri(output_uri, RUN_FILE)
    new = config.to_dict()
    if storage.exists(run_file):
        diffs = _differences(json.loads(storage.read_bytes(run_file)).get("config", {}), new)
        if diffs:
            raise InvalidCaseError(f"{output_uri} holds a PIE-Bench run made with other settings "
                                   f"({'; '.join(diffs)}); use the same parameters or another output_uri")
    else:
        from .. import __version__

        storage.write_bytes(run_file, json.dumps({"config": new, "editinfinity_version": __version__},
                                                 indent=2, sort_keys=True).encode())
    return [{"id": c.id, "edit_type": str(c.edit_type)} for c in data.cases]


def edit_case(data_uri: str, case_id: str, output_uri: str, config: BenchConfig, *, models_loader) -> str:
    """Edit one case and publish it under ``<output_uri>/cases/<id>/``; returns a small JSON result
    (``{"id", "status": "done"|"resumed"|"failed", "error"}``). ``models_loader()`` is called only when the case
    still needs an edit."""
    from .. import storage

    case_uri = join_uri(output_uri, CASES_DIR, case_id)
    if storage.exists(join_uri(case_uri, EDITED_FILE)):
        return json.dumps({"id": case_id, "status": "resumed"})
    with scratch_dir("editinfinity-piebench") as tmp:
        local = Path(tmp) / "case"
        try:
            mapping = json.loads(storage.read_bytes(join_uri(data_uri, MAPPING_FILE)))
            if case_id not in mapping:
                raise InvalidCaseError(f"PIE-Bench entry {case_id!r} is not in {join_uri(data_uri, MAPPING_FILE)}")
            case = parse_entry(case_id, mapping[case_id], join_uri(data_uri, IMAGES_DIR), check_image=False)
            if has_scheme(case.image):
                image = storage.download(case.image, Path(tmp) / Path(case.image_path).name)
                case = _with_image(case, str(image))
            edit_one(case, local, config, models=models_loader(), edit_fn=None)
        except Exception as exc:  # recorded, so that the other cases and the scoring step still run
            message = _error_text(exc)
            log.warning("case %s failed: %s", case_id, message)
            storage.write_bytes(join_uri(case_uri, ERROR_FILE), json.dumps(
                {"error": message, "type": type(exc).__name__, "config": config.to_dict()}, indent=2).encode())
            return json.dumps({"id": case_id, "status": "failed", "error": message})
        edited = local / EDITED_FILE
        staged = Path(tmp) / EDITED_FILE
        edited.rename(staged)
        storage.upload_dir(local, case_uri)
        # Last: marks the case done (an error.json of an earlier try is then ignored by the scoring step).
        storage.upload(staged, join_uri(case_uri, EDITED_FILE))
    return json.dumps({"id": case_id, "status": "done"})


def shard_cases(cases: list[dict], shards: int) -> list[dict]:
    """Deal the cases (``list_cases``' items) to at most ``shards`` worker shards, round robin (PIE-Bench has one
    edit per image, so every case costs about the same): ``[{"shard", "ids": "id,id,..."}]``, the ParallelFor
    items of the pipeline's GPU workers."""
    if shards < 1:
        raise InvalidCaseError(f"shards must be >= 1, got {shards}")
    bins = [[c["id"] for c in cases[i::shards]] for i in range(min(shards, len(cases)))]
    return [{"shard": str(i), "ids": ",".join(ids)} for i, ids in enumerate(bins)]


def edit_shard(data_uri: str, case_ids: str, output_uri: str, config: BenchConfig, *, models_loader) -> str:
    """A GPU worker over one shard: the models are loaded once (on the first case that needs an edit) and every
    case is edited as :func:`edit_case` does (resume, failures recorded); returns JSON counts by status."""
    loaded: list = []

    def models():
        if not loaded:
            loaded.append(models_loader())
        return loaded[0]

    counts = {"done": 0, "resumed": 0, "failed": 0}
    for case_id in filter(None, case_ids.split(",")):
        counts[json.loads(edit_case(data_uri, case_id, output_uri, config, models_loader=models))["status"]] += 1
    log.info("shard finished: %s", counts)
    return json.dumps(counts)


def _with_image(case: Any, image: str) -> Any:
    from dataclasses import replace

    return replace(case, image=image)


def score_all(data_uri: str, output_uri: str, config: BenchConfig, *, types: str = "", limit: int = 0,
              clip: str = "", dino: str = "", lpips: str = "", device: str | None = None,
              local_dir: str | Path | None = None):
    """Score every finished case, write the tables and grids, publish them to ``output_uri``.

    The per-case files are mirrored into a local folder (``local_dir`` or a temporary one) and scored there by
    :func:`run_piebench` with ``edit=False``; returns its :class:`BenchResult` (paths in the local folder).
    """
    from .. import storage
    from ..runtime import resolve_weights
    from .piebench_metrics import MetricModels
    from .piebench_run import run_piebench

    local = Path(local_dir or make_scratch("editinfinity-piebench-score"))
    data = read_piebench(data_uri, types=types or None, limit=limit or None, check_images=False)
    local.mkdir(parents=True, exist_ok=True)
    if storage.exists(join_uri(output_uri, RUN_FILE)):
        storage.download(join_uri(output_uri, RUN_FILE), local / RUN_FILE)
    for case in data.cases:
        case_uri, case_dir = join_uri(output_uri, CASES_DIR, case.id), local / CASES_DIR / case.id
        for name in (CASE_FILE, SCORES_FILE, ERROR_FILE, EDITED_FILE):
            if storage.exists(join_uri(case_uri, name)):
                case_dir.mkdir(parents=True, exist_ok=True)
                storage.download(join_uri(case_uri, name), case_dir / name)
        err = case_dir / ERROR_FILE
        if err.is_file() and (case_dir / EDITED_FILE).is_file():
            err.unlink()  # a later success superseded it
    models = MetricModels.load(clip=resolve_weights(clip), dino=resolve_weights(dino), lpips=resolve_weights(lpips),
                               device=device)
    result = run_piebench(data_uri, local, mode=config.mode, types=types or None, limit=limit or None,
                          preset=config.preset, weights=config.weights, resolution=config.resolution,
                          settings=config.settings, metric_models=models, edit=False, progress=False)
    for name in ("results.csv", "table.md", "table.html", "summary.json"):
        storage.upload(local / name, join_uri(output_uri, name))
    for grid in sorted((local / "grids").glob("*.png")):
        storage.upload(grid, join_uri(output_uri, "grids", grid.name))
    for case in data.cases:  # cache the scores next to the edits
        scores = local / CASES_DIR / case.id / SCORES_FILE
        if scores.is_file():
            storage.upload(scores, join_uri(output_uri, CASES_DIR, case.id, SCORES_FILE))
    return result


def table_metrics(result: Any) -> dict[str, float]:
    """Numbers for the KFP Metrics view: counts and the overall row's means (raw, unscaled)."""
    import math

    from .piebench_report import aggregate

    out = {"cases_scored": float(result.ok), "cases_failed": float(result.failed),
           "entries_malformed": float(result.invalid_entries)}
    for key, value in aggregate(result.rows)[-1].means.items():
        if value is not None and math.isfinite(value):
            out[f"mean_{key}"] = float(value)
    return out
