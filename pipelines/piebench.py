"""The PIE-Bench pipeline: select the cases, edit each (``dsl.ParallelFor``, capped), one scoring step.

```
piebench-cases (CPU) ─► ParallelFor(shards) { piebench-worker (GPU pod: models loaded once, its cases one after
another) } ─► piebench-score (GPU)
```

Results go to ``output_uri`` in the layout of ``editinfinity eval piebench --out``: ``cases/<id>/`` per case,
``results.csv``, ``table.md``, ``table.html`` and ``grids/`` at the top. A case already done there is not edited
again, so re-running the pipeline (or the CLI) on the same ``output_uri`` resumes it. Every task touches that
external state, so none is cached.
"""

from kfp import dsl

from components import piebench_cases, piebench_score, piebench_worker

from .profiles import Profile, cpu_task, gpu_task, pipeline_config, worker_task

PIEBENCH_PIPELINE = "editinfinity-piebench"


def make_piebench_pipeline(profile: Profile | None = None, parallelism: int | None = None):
    """Build ``piebench`` for ``profile`` (None: no Kubernetes settings); ``parallelism`` (default: the
    profile's, else 4) is the default number of worker shards and the cap on those running at once."""
    cap = parallelism or (profile.parallelism if profile else 4)
    if cap < 1:
        raise ValueError(f"`parallelism` must be >= 1, got {cap}")
    default_preset = profile.preset if profile else ""
    default_weights = profile.weights if profile else ""

    @dsl.pipeline(name=PIEBENCH_PIPELINE, pipeline_config=pipeline_config(profile),
                  description="EditInfinity on PIE-Bench: edit every case, score as PnP-Inversion, one table.")
    def piebench(data_uri: str, output_uri: str, mode: str = "auto", types: str = "", limit: int = 0,
                 shards: int = cap, preset: str = default_preset, weights: str = default_weights, resolution: str = "",
                 prompt_iters: int = 10, lora_iters: int = 50, seed: int = 0, threshold: float = -1.0,
                 clip: str = "", dino: str = "", lpips: str = ""):
        """Edit and score PIE-Bench.

        Args:
            data_uri: PIE-Bench folder with mapping_file.json and annotation_images/ (path, gs://, s3://).
            output_uri: Results root (required): cases/<id>/, results.csv, table.md, table.html, grids/.
            mode: auto | mask | whole.
            types: Edit types, e.g. "0,1,9"; empty for all ten.
            limit: Only the first N selected entries; 0 for all.
            shards: GPU worker pods (each edits its share of the cases with the models loaded once).
            preset: Model preset name.
            weights: Converted weights directory or URI.
            resolution: Pixel budget; empty for the preset's default (1M for 2b).
            prompt_iters: Prompt-tuning updates.
            lora_iters: LoRA updates.
            seed: Random seed.
            threshold: Attention-mask threshold in [0, 1); -1 (default, any negative): the preset's (0.3 toy, 0.5 otherwise).
            clip: CLIP weights (openai/clip-vit-large-patch14 as a folder on the model cache); empty: not computed.
            dino: DINO ViT-B/8 weights (facebook/dino-vitb8 folder or dino_vitbase8_pretrain.pth); empty: not computed.
            lpips: Folder with squeezenet1_1-*.pth and LPIPS v0.1 squeeze.pth; empty: not computed.
        """
        settings = dict(preset=preset, weights=weights, resolution=resolution, prompt_iters=prompt_iters,
                        lora_iters=lora_iters, seed=seed, threshold=threshold)
        cases = cpu_task(piebench_cases(data_uri=data_uri, output_uri=output_uri, mode=mode, types=types,
                                        limit=limit, shards=shards, **settings)
                         .set_display_name("select cases").set_caching_options(False), profile, retries=False)
        with dsl.ParallelFor(cases.output, parallelism=cap, name="shards") as shard:
            edit = worker_task(piebench_worker(data_uri=data_uri, case_ids=shard.ids, output_uri=output_uri,
                                               mode=mode, **settings)
                               .set_display_name("worker").set_caching_options(False), profile)
        gpu_task(piebench_score(results=dsl.Collected(edit.output), data_uri=data_uri, output_uri=output_uri,
                                mode=mode, types=types, limit=limit, clip=clip, dino=dino, lpips=lpips, **settings)
                 .set_display_name("score").set_caching_options(False), profile)

    return piebench
