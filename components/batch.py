"""Batch components: plan the batch (CPU), run one shard (GPU worker pod), summarise every case's outcome (CPU).

Thin wrappers over ``editinfinity.batch``. The worker never fails for a bad case (each case's status is recorded
under ``<output_uri>/_status/``), so a failing worker task means the pod itself failed (preemption, out of memory,
a node problem): retrying it resumes where it stopped. The summary reads the plan and the statuses only, so it runs
(``ignore_upstream_failure``) and reports even when some workers failed.
(No ``from __future__ import annotations`` here: kfp reads the annotations at decoration time.)
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output

from .images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def batch_plan(cases_uri: str, output_uri: str, shards: int, preset: str, weights: str, resolution: str,
               mask_polarity: str, prompt_iters: int, lora_iters: int, seed: int, threshold: float,
               plan: Output[Dataset], report: Output[Markdown]) -> list:
    """Validate every case, group the valid ones by image and prompt, split them into shards.

    Args:
        cases_uri: JSONL cases file (path, gs://, s3://): one case per line with ``image``, ``prompt``,
            ``edit_prompt`` and optionally ``id``, ``mode``, ``target_word``, ``mask`` and the case's own run settings
            (``seed``, ``prompt_iters``, ``lora_iters``, ``threshold``; ``preset`` must be the batch's); relative
            paths are resolved against the file's folder.
        output_uri: Results root: ``<output_uri>/<id>/`` per case, ``index.html`` over all.
        shards: Number of worker pods.
        preset: Model preset name; empty for the default preset.
        weights: Converted weights directory or URI.
        resolution: Pixel budget; empty for the preset's default.
        mask_polarity: white-edit | black-edit (the batch's user masks).
        prompt_iters: Prompt-tuning updates.
        lora_iters: LoRA updates.
        seed: Random seed.
        threshold: Attention-mask threshold in [0, 1); negative for the preset's (0.3 toy, 0.5 otherwise).
        plan: The plan every worker reads (JSON).
        report: Counts and the invalid cases with their errors.

    Returns:
        The shard numbers, one ``dsl.ParallelFor`` item each.
    """
    from pathlib import Path

    from editinfinity import runtime as rt
    from editinfinity import storage
    from editinfinity.batch.cases import read_cases
    from editinfinity.batch.plan import make_plan, write_plan

    settings = rt.edit_settings(prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed, threshold=threshold)
    made = make_plan(read_cases(cases_uri, output_uri), output_uri=output_uri, shards=shards, preset=preset,
                     weights=weights, resolution=resolution, mask_polarity=mask_polarity, settings=settings)
    write_plan(made, plan.path)
    storage.upload(plan.path, f"{output_uri.rstrip('/')}/_batch/plan.json")
    lines = [f"# Batch plan: {len(made.cases)} valid cases in {len(made.groups)} images, {len(made.shards)} shards, "
             f"{len(made.invalid)} invalid", ""]
    lines += [f"- `{c['id']}`: {c['error']}" for c in made.invalid]
    Path(report.path).write_text("\n".join(lines) + "\n")
    plan.metadata.update(valid=len(made.cases), invalid=len(made.invalid), groups=len(made.groups))
    return list(range(len(made.shards)))


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def batch_worker(plan: Input[Dataset], shard: int, processes: int, learned_cache: str, local_weights: str,
                 metrics: Output[Metrics]) -> str:
    """Run one shard: models loaded once per process, each image learned once, cases published as they finish.

    Args:
        plan: The batch plan.
        shard: Which shard.
        processes: Worker processes in this pod, one per GPU (the profile's GPUs per worker).
        learned_cache: Folder of learned states keyed by content (on the model-cache volume); empty for none.
        local_weights: Node-local folder to copy the weights to before loading; empty to read them in place.
        metrics: ``cases_done`` and ``cases_failed`` of this shard.

    Returns:
        JSON counts of this shard's cases by status.
    """
    import json

    from editinfinity.batch import worker

    kw = {"learned_cache": learned_cache or None, "local_weights": local_weights or None}
    if processes > 1:
        statuses = worker.run_processes(plan.path, shard, [f"cuda:{i}" for i in range(processes)], **kw)
    else:
        from editinfinity.batch.plan import read_plan

        statuses = worker.run_shard(read_plan(plan.path), shard, **kw)
    counts = {s: sum(x["status"] == s for x in statuses) for s in ("done", "failed")}
    for name, n in counts.items():
        metrics.log_metric(f"cases_{name}", n)
    return json.dumps({"shard": shard, **counts})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def batch_summary(page: Output[HTML], page_md: Output[Markdown], metrics: Output[Metrics],
                  plan: Input[Dataset] = None, results: list = []) -> str:  # noqa: B006 (kfp needs a literal)
    """One page over every case's outcome (done, failed, invalid, not run), published as ``<output_uri>/index.html``.

    Args:
        page: The batch page, shown in the KFP UI (links open each case's report).
        page_md: The same table in Markdown.
        metrics: ``cases_done``, ``cases_failed``, ``cases_invalid``, ``cases_not_run`` and mean quality figures.
        plan: The batch plan (absent when planning failed).
        results: The workers' counts (absent for workers that failed; the page reads the statuses instead).

    Returns:
        JSON counts by outcome.
    """
    import json
    from pathlib import Path

    from editinfinity.batch.outcomes import publish_summary, summarize_batch
    from editinfinity.batch.plan import read_plan

    if plan is None or not Path(plan.path).is_file():
        Path(page.path).write_text("<!doctype html><p>The batch plan step failed: see its log.</p>\n")
        Path(page_md.path).write_text("The batch plan step failed: see its log.\n")
        return json.dumps({})
    made = read_plan(plan.path)
    summary = summarize_batch(made)
    Path(page.path).write_text(summary.html)
    Path(page_md.path).write_text(summary.markdown)
    for name, value in summary.metrics.items():
        metrics.log_metric(name, value)
    publish_summary(made, summary)
    return json.dumps(summary.counts)
