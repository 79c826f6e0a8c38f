"""The batch pipeline: read a JSONL manifest of cases, edit each (``dsl.ParallelFor``, capped), one summary page.

Each case runs the ``edit`` pipeline as a nested graph (same stages, same mode branches, same scheduling) and
publishes to ``<output_uri>/<case id>``; the per-case results are ``dsl.Collected`` into ``batch_summary``.
"""

from kfp import dsl

from components import batch_summary, read_manifest

from .edit import make_edit_pipeline
from .profiles import Profile, cpu_task

BATCH_PIPELINE = "editinfinity-batch-edit"


def make_batch_pipeline(profile: Profile | None = None, fused: bool = False, parallelism: int | None = None):
    """Build ``batch_edit`` for ``profile``; ``parallelism`` (default: the profile's, else 4) caps concurrent cases."""
    cap = parallelism or (profile.parallelism if profile else 4)
    if cap < 1:
        raise ValueError(f"`parallelism` must be >= 1, got {cap}")
    edit = make_edit_pipeline(profile, fused=fused)
    default_preset = profile.preset if profile else ""
    default_weights = profile.weights if profile else ""
    name = f"{BATCH_PIPELINE}-fused" if fused else BATCH_PIPELINE

    @dsl.pipeline(name=name, description="EditInfinity edits of every case of a JSONL manifest, with one summary page.")
    def batch_edit(manifest_uri: str, output_uri: str, mask_polarity: str = "white-edit",
                   preset: str = default_preset, weights: str = default_weights, resolution: str = "",
                   prompt_iters: int = 10, lora_iters: int = 50, seed: int = 0, threshold: float = 0.5):
        """Edit every case of a manifest.

        Args:
            manifest_uri: JSONL manifest (local path, gs://, s3://); see ``components.report.read_manifest``.
            output_uri: Output root: ``<output_uri>/<id>/`` per case and ``<output_uri>/index.html``.
            mask_polarity: white-edit | black-edit (user masks of the batch).
            preset: Model preset name.
            weights: Converted weights directory or URI.
            resolution: Pixel budget; empty for the preset's default.
            prompt_iters: Prompt-tuning updates.
            lora_iters: LoRA updates.
            seed: Random seed.
            threshold: Attention-mask threshold.
        """
        cases = cpu_task(read_manifest(manifest_uri=manifest_uri, output_uri=output_uri)
                         .set_display_name("read manifest").set_caching_options(False), profile)
        with dsl.ParallelFor(cases.output, parallelism=cap, name="cases") as case:
            result = edit(image_uri=case.image, prompt=case.prompt, edit_prompt=case.edit_prompt, mode=case.mode,
                          target_word=case.target_word, mask_uri=case.mask, mask_polarity=mask_polarity,
                          preset=preset, weights=weights, resolution=resolution, prompt_iters=prompt_iters,
                          lora_iters=lora_iters, seed=seed, threshold=threshold, output_uri=case.output_uri,
                          case_id=case.id).set_display_name("edit case")
        cpu_task(batch_summary(results=dsl.Collected(result.output), output_uri=output_uri)
                 .set_display_name("batch summary").set_caching_options(False), profile)

    return batch_edit
