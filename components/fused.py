"""All GPU stages in one pod (one model load, ``stages.run_edit``), still emitting every intermediate artifact."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model, Output

from .images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def fused_edit(image_uri: str, prompt: str, edit_prompt: str, mode: str, target_word: str, mask_uri: str,
               mask_polarity: str, resolution: str, preset: str, weights: str, prompt_iters: int, lora_iters: int,
               seed: int, threshold: float, case: Output[Dataset], prompt_embedding: Output[Model],
               lora: Output[Model], attention_map: Output[Artifact], edit_mask: Output[Artifact],
               edited: Output[Artifact]):
    """Run prepare, tune-prompt, train-lora, attention, mask and generate in one process.

    Parameters mean the same as in the per-stage components (``threshold``: negative for the preset's). Stages a mode skips (attention outside mode auto,
    the mask in mode whole) leave an output folder holding only ``skipped.json``.
    """
    import shutil
    from pathlib import Path

    from editinfinity import runtime as rt
    from editinfinity.edit import stages
    from editinfinity.scratch import make_scratch, scratch_dir

    # Work next to the outputs (same filesystem), so handing each stage folder over is a rename; split_fused_run
    # removes the work folder, a failure here removes it, and one a SIGKILL left is removed by the next pod's run.
    work = make_scratch("editinfinity-fused", dir=Path(case.path).parent) / "run"
    try:
        with scratch_dir("editinfinity-fused-inputs") as tmp:
            image = rt.fetch(image_uri, f"{tmp}/image")
            mask = rt.fetch(mask_uri, f"{tmp}/mask") if mask_uri else None
            stages.run_edit(work, image=image, prompt=prompt, edit_prompt=edit_prompt, mode=mode,
                            target_word=target_word or None, mask=mask, mask_polarity=mask_polarity,
                            resolution=resolution or None, preset=preset or None,
                            models_loader=lambda: rt.load_models(preset, weights),  # timed as load_models
                            settings=rt.edit_settings(prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed,
                                                      threshold=threshold), progress=False)
    except BaseException:
        shutil.rmtree(work.parent, ignore_errors=True)
        raise
    # run_edit writes OUT/stages/<stage>; each becomes its own output artifact.
    rt.split_fused_run(work, {"case": case, "prompt": prompt_embedding, "lora": lora, "attention": attention_map,
                              "mask": edit_mask, "generate": edited})
    case.metadata.update(image_uri=image_uri, mode=mode)
