"""One KFP component per edit stage: parse artifacts, call one ``editinfinity.edit.stages`` function, write artifacts.

Bodies are copied into the pod as source, so every import sits inside the function; the work is done by the core
library in the image (``editinfinity.edit.stages``) and the small runtime helpers in ``editinfinity.runtime``.
Artifact folders: the case is a ``Dataset``, the prompt embedding and the LoRA adapter are ``Model``s, the attention
map, the edit mask/weights and the edited images are ``Artifact`` folders. Every output records ``seconds`` (from
the stage's ``stage.json``), the stage name and run id in its metadata, shown in the KFP UI.
(No ``from __future__ import annotations`` here: kfp reads the annotations at decoration time.)
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from .images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def check_case(image_uri: str, prompt: str, edit_prompt: str, mode: str, target_word: str, mask_uri: str,
               mask_polarity: str, resolution: str, preset: str, weights: str, prompt_iters: int, lora_iters: int,
               seed: int, threshold: float) -> str:
    """Validate the inputs on a CPU before any GPU pod starts (bad input fails here, once, without retries) and
    return the key of their content, which keys the cache of the GPU stages.

    Args:
        image_uri: Source image: local path, gs:// or s3:// URI.
        prompt: Source prompt.
        edit_prompt: Target prompt.
        mode: auto | mask | whole.
        target_word: Word(s) of the source prompt to edit (mode auto).
        mask_uri: User mask image URI (mode mask).
        mask_polarity: white-edit | black-edit.
        resolution: Pixel budget; empty for the preset's default.
        preset: Model preset name.
        weights: Converted weights directory or URI.
        prompt_iters: Prompt-tuning updates.
        lora_iters: LoRA updates.
        seed: Random seed.
        threshold: Attention-mask threshold in [0, 1); negative for the preset's (0.3 toy, 0.5 otherwise).

    Returns:
        The content key (image pixels, mask bytes, prompts, mode fields, settings).
    """
    from editinfinity import runtime as rt

    return rt.case_content_key(image_uri=image_uri, prompt=prompt, edit_prompt=edit_prompt, mode=mode,
                               target_word=target_word, mask_uri=mask_uri, mask_polarity=mask_polarity,
                               resolution=resolution, preset=preset, weights=weights,
                               settings={"prompt_iters": prompt_iters, "lora_iters": lora_iters, "seed": seed,
                                         "threshold": rt.mask_threshold(threshold)})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def prepare(image_uri: str, prompt: str, edit_prompt: str, mode: str, target_word: str, mask_uri: str,
            mask_polarity: str, resolution: str, preset: str, weights: str, case: Output[Dataset],
            content_key: str = ""):
    """Fetch the source image (and user mask) by URI and build the case: codes, prompt features, schedule.

    Args:
        image_uri: Source image: local path, gs:// or s3:// URI.
        prompt: Source prompt describing the image.
        edit_prompt: Target prompt describing the edited image.
        mode: "auto" (mask from the target word's attention), "mask" (user mask) or "whole" (no mask).
        target_word: Word(s) of the source prompt to edit (mode auto); empty otherwise.
        mask_uri: User mask image URI (mode mask); empty otherwise.
        mask_polarity: "white-edit" (white = edit) or "black-edit".
        resolution: Pixel budget ("0.06M", "0.25M", "0.60M", "1M"); empty for the preset's default.
        preset: Model preset name ("tiny", "toy", "2b", ...); empty for the default preset.
        weights: Converted weights directory or URI (gs://, s3://), fetched once per pod; empty for the preset's.
        case: Output case folder (``case.json``, ``image.png``, codes and text features).
        content_key: The inputs' content key (``check_case``); not read here: as a parameter it keys KFP's cache,
            so a run with the same content reuses this case and every cached stage after it.
    """
    from editinfinity import runtime as rt
    from editinfinity.edit import stages
    from editinfinity.scratch import scratch_dir

    with scratch_dir("editinfinity-prepare") as tmp:
        image = rt.fetch(image_uri, f"{tmp}/image")
        mask = rt.fetch(mask_uri, f"{tmp}/mask") if mask_uri else None
        stages.prepare(case.path, image=image, prompt=prompt, edit_prompt=edit_prompt, mode=mode,
                       target_word=target_word or None, mask=mask, mask_polarity=mask_polarity,
                       resolution=resolution or None, preset=preset or None, models=rt.load_models(preset, weights))
    case.metadata.update(rt.stage_metadata(case.path, image_uri=image_uri, mode=mode))


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def tune_prompt(case: Input[Dataset], iters: int, seed: int, preset: str, weights: str,
                prompt_embedding: Output[Model]):
    """Learn the prompt embedding rows that reconstruct the source image (stage B).

    Args:
        case: The prepared case.
        iters: Optimizer updates.
        seed: Random seed.
        preset: Model preset name (same as prepare).
        weights: Converted weights directory or URI (same as prepare).
        prompt_embedding: Output folder with ``prompt_embedding.safetensors``.
    """
    from editinfinity import runtime as rt
    from editinfinity.edit import stages

    stages.tune_prompt(case.path, prompt_embedding.path, iters=iters, seed=seed,
                       models=rt.load_models(preset, weights, text_encoder=False))
    prompt_embedding.metadata.update(rt.stage_metadata(prompt_embedding.path))


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_lora(case: Input[Dataset], prompt_embedding: Input[Model], iters: int, seed: int, preset: str,
               weights: str, lora: Output[Model]):
    """Train the LoRA adapter on the transformer's FFN layers (stage C).

    Args:
        case: The prepared case.
        prompt_embedding: The tuned prompt embedding.
        iters: Optimizer updates.
        seed: Random seed.
        preset: Model preset name (same as prepare).
        weights: Converted weights directory or URI (same as prepare).
        lora: Output peft adapter folder.
    """
    from editinfinity import runtime as rt
    from editinfinity.edit import stages

    stages.train_lora(case.path, prompt_embedding.path, lora.path, iters=iters, seed=seed,
                      models=rt.load_models(preset, weights, text_encoder=False))
    lora.metadata.update(rt.stage_metadata(lora.path))


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def attention(case: Input[Dataset], preset: str, weights: str, attention_map: Output[Artifact]):
    """Cross-attention map of the target word at the last scale (mode auto).

    Args:
        case: The prepared case.
        preset: Model preset name (same as prepare).
        weights: Converted weights directory or URI (same as prepare).
        attention_map: Output folder with ``attention.safetensors`` and ``attention.png``.
    """
    from editinfinity import runtime as rt
    from editinfinity.edit import stages

    stages.attention(case.path, attention_map.path, models=rt.load_models(preset, weights, text_encoder=False))
    attention_map.metadata.update(rt.stage_metadata(attention_map.path))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def mask(case: Input[Dataset], threshold: float, edit_mask: Output[Artifact],
         attention_map: Input[Artifact] | None = None):
    """Edit mask and smoothing weights, from the attention map (auto) or the user's mask in the case (mask).

    Args:
        case: The prepared case.
        threshold: Attention threshold between the map's min and max (mode auto); negative for the case's
            preset's (``Preset.mask_threshold``). The stage records the value used.
        edit_mask: Output folder with ``mask.png``, ``weights.safetensors`` and ``weights.png``.
        attention_map: The attention map (mode auto); absent in mode mask.
    """
    from editinfinity import runtime as rt
    from editinfinity.edit import stages

    stages.make_mask(case.path, edit_mask.path, attention_dir=rt.optional_dir(attention_map),
                     threshold=rt.mask_threshold(threshold))
    edit_mask.metadata.update(rt.stage_metadata(edit_mask.path))


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def generate(case: Input[Dataset], prompt_embedding: Input[Model], lora: Input[Model], seed: int, preset: str,
             weights: str, edited: Output[Artifact], edit_mask: Input[Artifact] | None = None):
    """Generate the edited image, blending the source codes outside the edit region (stage G).

    Args:
        case: The prepared case.
        prompt_embedding: The tuned prompt embedding.
        lora: The LoRA adapter.
        seed: Sampling seed.
        preset: Model preset name (same as prepare).
        weights: Converted weights directory or URI (same as prepare).
        edited: Output folder with ``edited.png`` and ``reconstruction.png``.
        edit_mask: Mask and smoothing weights (modes auto and mask); absent in mode whole.
    """
    from editinfinity import runtime as rt
    from editinfinity.edit import stages

    stages.generate(case.path, prompt_embedding.path, lora.path, edited.path, mask_dir=rt.optional_dir(edit_mask),
                    seed=seed, models=rt.load_models(preset, weights, text_encoder=False))
    edited.metadata.update(rt.stage_metadata(edited.path))
    # Carry the upstream timings so the summary needs no extra (large) inputs to report them.
    edited.metadata["timings"] = rt.collect_timings(case, prompt_embedding, lora, edit_mask, edited)
