"""The batch pipeline: plan on a CPU, long-lived GPU workers over shards, one summary of every case's outcome.

```
batch-plan (CPU: validate, group by image, shard) ─► ParallelFor(shards) { batch-worker (GPU pod, one process per
GPU: models loaded once, each image learned once, resume, per-case status) } ─► batch-summary (CPU, runs even when
workers failed)
```

Each case publishes to ``<output_uri>/<id>/`` (``editinfinity edit``'s layout) as soon as it is done, and
``<output_uri>/index.html`` lists every case: done (link to its report), failed or invalid (with the error), not run.
Re-running the pipeline on the same ``output_uri`` resumes: finished cases are skipped. Learned states go to a
content-keyed folder on the model-cache volume, so a re-run, or new edit prompts for images already learned, reuse
them. To debug one case, run the ``edit`` pipeline (one pod per stage) on it.
"""

from kfp import dsl

from components import batch_plan, batch_summary, batch_worker

from .profiles import Profile, cpu_task, pipeline_config, worker_task

BATCH_PIPELINE = "editinfinity-batch-edit"


def make_batch_pipeline(profile: Profile | None = None, fused: bool = False, parallelism: int | None = None):
    """Build ``batch_edit`` for ``profile``; ``parallelism`` (default: the profile's, else 4) is the default number
    of shards (worker pods) and the cap on concurrently running ones."""
    if fused:
        raise ValueError("the batch pipeline has no fused variant: each worker already runs every stage of its "
                         "cases in one process")
    cap = parallelism or (profile.parallelism if profile else 4)
    if cap < 1:
        raise ValueError(f"`parallelism` must be >= 1, got {cap}")
    default_preset = profile.preset if profile else ""
    default_weights = profile.weights if profile else ""
    default_cache = f"{profile.model_cache_path}/learned" if profile and profile.model_cache_pvc else ""
    gpus = profile.worker_gpus if profile else 1
    local_weights = profile.local_weights_path if profile and profile.local_weights_size else ""

    @dsl.pipeline(name=BATCH_PIPELINE, pipeline_config=pipeline_config(profile),
                  description="EditInfinity edits of every case of a JSONL cases file on sharded GPU workers, "
                              "with one summary page.")
    def batch_edit(cases_uri: str, output_uri: str, shards: int = cap, mask_polarity: str = "white-edit",
                   preset: str = default_preset, weights: str = default_weights, resolution: str = "",
                   prompt_iters: int = 10, lora_iters: int = 50, seed: int = 0, threshold: float = -1.0,
                   learned_cache: str = default_cache):
        """Edit every case of a cases file.

        Args:
            cases_uri: JSONL cases file (local path, gs://, s3://); see ``components.batch.batch_plan``.
            output_uri: Results root: ``<output_uri>/<id>/`` per case and ``<output_uri>/index.html``.
            shards: Worker pods (each takes a balanced share of the images).
            mask_polarity: white-edit | black-edit (user masks of the batch).
            preset: Model preset name.
            weights: Converted weights directory or URI.
            resolution: Pixel budget; empty for the preset's default.
            prompt_iters: Prompt-tuning updates.
            lora_iters: LoRA updates.
            seed: Random seed.
            threshold: Attention-mask threshold in [0, 1); -1 (default, any negative): the preset's (0.3 toy, 0.5 otherwise).
            learned_cache: Folder of learned states keyed by content (shared by runs); empty for none.
        """
        plan = cpu_task(batch_plan(cases_uri=cases_uri, output_uri=output_uri, shards=shards, preset=preset,
                                   weights=weights, resolution=resolution, mask_polarity=mask_polarity,
                                   prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed, threshold=threshold)
                        .set_display_name("plan (validate, group, shard)").set_caching_options(False), profile,
                        retries=False)
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=cap, name="shards") as shard:
            work = worker_task(batch_worker(plan=plan.outputs["plan"], shard=shard, processes=gpus,
                                            learned_cache=learned_cache, local_weights=local_weights)
                               .set_display_name("worker").set_caching_options(False), profile)
        summary = cpu_task(batch_summary(plan=plan.outputs["plan"], results=dsl.Collected(work.outputs["Output"]))
                           .set_display_name("summary").set_caching_options(False), profile)
        if profile is not None:
            # On a cluster the summary runs whatever happened to the workers (preempted pods, exhausted retries).
            # kfp.local (no profile) would run it after a failed plan too, then fail on the missing loop outputs;
            # locally a worker only fails on a bug, and the run should stop there.
            summary.ignore_upstream_failure()

    return batch_edit

