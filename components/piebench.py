"""PIE-Bench components: list the cases (CPU), edit a shard of cases (GPU worker, models loaded once), score them all (GPU).

Thin wrappers over ``editinfinity.evaluation.piebench_steps``; every result lives under ``output_uri`` in the layout of
``editinfinity eval piebench --out`` (so the pipeline and the CLI resume each other's runs). The scoring step runs
on a GPU node because that is where the model-cache volume holding the CLIP / DINO / LPIPS weights is mounted.
(No ``from __future__ import annotations`` here: kfp reads the annotations at decoration time.)
"""

from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Output

from .images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def piebench_cases(data_uri: str, output_uri: str, mode: str, types: str, limit: int, shards: int, preset: str,
                   weights: str, resolution: str, prompt_iters: int, lora_iters: int, seed: int,
                   threshold: float) -> list:
    """Read the mapping file, select the cases, record (or check) the run's settings in ``bench.json``, and deal
    the cases to the GPU workers' shards.

    Args:
        data_uri: PIE-Bench folder holding ``mapping_file.json`` and ``annotation_images/`` (path, gs://, s3://).
        output_uri: Results root; ``<output_uri>/bench.json`` must match these settings when it exists.
        mode: auto | mask | whole.
        types: Edit types to run, e.g. "0,1,9"; empty for all.
        limit: Only the first N selected entries; 0 for all.
        shards: Number of GPU worker pods.
        preset: Model preset name; empty for the default preset.
        weights: Converted weights directory or URI.
        resolution: Pixel budget; empty for the preset's default.
        prompt_iters: Prompt-tuning updates.
        lora_iters: LoRA updates.
        seed: Random seed.
        threshold: Attention-mask threshold in [0, 1); negative for the preset's (0.3 toy, 0.5 otherwise).

    Returns:
        One ``{"shard", "ids"}`` per worker: the well-formed selected cases' ids, comma-separated (malformed
        entries are reported by scoring).
    """
    from editinfinity.evaluation import piebench_steps as bk

    config = bk.bench_config(mode=mode, preset=preset, weights=weights, resolution=resolution,
                             prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed, threshold=threshold)
    return bk.shard_cases(bk.list_cases(data_uri, output_uri, config, types=types, limit=limit), shards)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def piebench_worker(data_uri: str, case_ids: str, output_uri: str, mode: str, preset: str, weights: str,
                    resolution: str, prompt_iters: int, lora_iters: int, seed: int, threshold: float) -> str:
    """Edit one shard of PIE-Bench cases with the models loaded once, publishing each to ``<output_uri>/cases/<id>/``.

    A case already done there is skipped; a case that fails records ``error.json`` and the worker goes on (the
    task itself succeeds, so the other shards and the scoring step still run).

    Args:
        data_uri: PIE-Bench folder.
        case_ids: The shard's entry ids (12 digits in PIE-Bench), comma-separated.
        output_uri: Results root.
        mode: auto | mask | whole.
        preset: Model preset name.
        weights: Converted weights directory or URI.
        resolution: Pixel budget; empty for the preset's default.
        prompt_iters: Prompt-tuning updates.
        lora_iters: LoRA updates.
        seed: Random seed.
        threshold: Attention-mask threshold in [0, 1); negative for the preset's (0.3 toy, 0.5 otherwise).

    Returns:
        JSON counts of the shard's cases by status (done, resumed, failed).
    """
    from editinfinity import runtime as rt
    from editinfinity.evaluation import piebench_steps as bk

    config = bk.bench_config(mode=mode, preset=preset, weights=weights, resolution=resolution,
                             prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed, threshold=threshold)
    return bk.edit_shard(data_uri, case_ids, output_uri, config, models_loader=lambda: rt.load_models(preset, weights))


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def piebench_score(results: list, data_uri: str, output_uri: str, mode: str, types: str, limit: int, preset: str,
                   weights: str, resolution: str, prompt_iters: int, lora_iters: int, seed: int, threshold: float,
                   clip: str, dino: str, lpips: str, table: Output[HTML], table_md: Output[Markdown],
                   metrics: Output[Metrics]):
    """Score every finished case as PnP-Inversion does; publish ``results.csv``, ``table.md``, ``table.html``
    and ``grids/`` to ``output_uri``.

    Args:
        results: The workers' counts (collected; only waited for).
        data_uri: PIE-Bench folder.
        output_uri: Results root.
        mode: auto | mask | whole (as the edits).
        types: Edit types, as the cases step.
        limit: Entry limit, as the cases step.
        preset: Model preset name (recorded in the table header).
        weights: Converted weights (recorded in the table header).
        resolution: Pixel budget (recorded).
        prompt_iters: Prompt-tuning updates (recorded).
        lora_iters: LoRA updates (recorded).
        seed: Random seed (recorded).
        threshold: Attention-mask threshold (recorded); negative for the preset's.
        clip: CLIP weights (folder on the model cache, hub id, gs:// / s3://); empty: not computed.
        dino: DINO ViT-B/8 weights (transformers folder / hub id, or dino_vitbase8_pretrain.pth); empty: not computed.
        lpips: Folder with squeezenet1_1-*.pth and LPIPS v0.1 squeeze.pth; empty: not computed.
        table: The table page (with the thumbnail grids), shown in the KFP UI.
        table_md: The table in Markdown.
        metrics: Case counts and the overall means.
    """
    import base64
    import re
    from pathlib import Path

    from editinfinity.evaluation import piebench_steps as bk

    config = bk.bench_config(mode=mode, preset=preset, weights=weights, resolution=resolution,
                             prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed, threshold=threshold)
    result = bk.score_all(data_uri, output_uri, config, types=types, limit=limit, clip=clip, dino=dino, lpips=lpips)
    page = result.files["html"].read_text()

    def inline(match):  # the UI shows one file: embed the grids
        data = base64.b64encode((result.out_dir / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    Path(table.path).write_text(re.sub(r'src="(grids/[^"]+)"', inline, page))
    Path(table_md.path).write_text(result.files["markdown"].read_text())
    for name, value in bk.table_metrics(result).items():
        metrics.log_metric(name, value)
