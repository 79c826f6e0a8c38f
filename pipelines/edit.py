"""The single-edit pipeline: prepare -> tune-prompt -> train-lora -> (attention -> mask) -> generate -> summary.

The three modes are ``dsl.If``/``Elif``/``Else`` branches: auto (attention -> mask from the target word), mask
(mask from the user's mask image) and whole (no mask). ``fused=True`` runs every GPU stage in one pod instead.
Pipelines are built by a factory because the scheduling profile is chosen at compile time.
"""

from kfp import dsl
from kfp.dsl import PipelineTask

from components import attention as attention_op
from components import check_case, fused_edit, generate, mask, prepare, summarize, train_lora, tune_prompt

from .profiles import Profile, cpu_task, gpu_task

EDIT_PIPELINE = "editinfinity-edit"


def _gpu(task: PipelineTask, profile: Profile | None, name: str, cache: bool = True) -> PipelineTask:
    return gpu_task(task.set_display_name(name).set_caching_options(cache), profile)


def _cpu(task: PipelineTask, profile: Profile | None, name: str, cache: bool = True) -> PipelineTask:
    return cpu_task(task.set_display_name(name).set_caching_options(cache), profile)


def make_edit_pipeline(profile: Profile | None = None, fused: bool = False):
    """Build the ``edit`` pipeline for ``profile`` (None: no Kubernetes settings, for kfp.local).

    Caching: check-case (CPU) reads the inputs by URI and always runs; it returns their content key, a parameter of
    prepare, so prepare is cached by content (a changed file behind the same URI misses, the same content hits),
    and tune-prompt, train-lora, attention, mask and generate, determined by their input artifacts and parameters,
    hit after it. The summary publishes to ``output_uri`` and the fused task is one pod: both always run.
    """
    default_preset = profile.preset if profile else ""
    default_weights = profile.weights if profile else ""
    name = f"{EDIT_PIPELINE}-fused" if fused else EDIT_PIPELINE

    @dsl.pipeline(name=name, description="EditInfinity text-guided image edit of one image (modes auto, mask, whole).")
    def edit(image_uri: str, prompt: str, edit_prompt: str, mode: str = "auto", target_word: str = "",
             mask_uri: str = "", mask_polarity: str = "white-edit", preset: str = default_preset,
             weights: str = default_weights, resolution: str = "", prompt_iters: int = 10, lora_iters: int = 50,
             seed: int = 0, threshold: float = -1.0, output_uri: str = "", case_id: str = "") -> str:
        """Edit one image.

        Args:
            image_uri: Source image (local path, gs://, s3://).
            prompt: Source prompt.
            edit_prompt: Target prompt.
            mode: auto | mask | whole.
            target_word: Word(s) of the source prompt to edit (mode auto).
            mask_uri: User mask image (mode mask).
            mask_polarity: white-edit | black-edit.
            preset: Model preset name.
            weights: Converted weights: directory on the model-cache volume, or gs:// / s3:// URI.
            resolution: Pixel budget (0.06M, 0.25M, 0.60M, 1M); empty for the preset's default.
            prompt_iters: Prompt-tuning updates.
            lora_iters: LoRA updates.
            seed: Random seed.
            threshold: Attention-mask threshold in [0, 1); -1 (default, any negative): the preset's (0.3 toy, 0.5 otherwise); mode auto.
            output_uri: Where to publish the results; empty keeps them in the pipeline root only.
            case_id: Case name (batch runs).
        """
        inputs = dict(image_uri=image_uri, prompt=prompt, edit_prompt=edit_prompt, mode=mode,
                      target_word=target_word, mask_uri=mask_uri, mask_polarity=mask_polarity,
                      resolution=resolution, preset=preset, weights=weights)
        model = dict(preset=preset, weights=weights)
        # Bad input fails here, on a CPU, once (no retries); the key of the inputs' content keys the GPU stages'
        # cache, so a run on the same content reuses every stage up to the summary.
        check = cpu_task(check_case(**inputs, prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed,
                                    threshold=threshold).set_display_name("check inputs").set_caching_options(False),
                         profile, retries=False)
        if fused:
            run = _gpu(fused_edit(**inputs, prompt_iters=prompt_iters, lora_iters=lora_iters, seed=seed,
                                  threshold=threshold).after(check), profile, "fused edit", cache=False)
            out = run.outputs
            report = _cpu(summarize(case=out["case"], edited=out["edited"], edit_mask=out["edit_mask"],
                                    attention_map=out["attention_map"], output_uri=output_uri, case_id=case_id),
                          profile, "summary", cache=False)
            return report.outputs["Output"]

        case = _gpu(prepare(**inputs, content_key=check.output), profile, "prepare").outputs["case"]
        prompt_embedding = _gpu(tune_prompt(case=case, iters=prompt_iters, seed=seed, **model), profile,
                                "tune prompt").outputs["prompt_embedding"]
        lora = _gpu(train_lora(case=case, prompt_embedding=prompt_embedding, iters=lora_iters, seed=seed, **model),
                    profile, "train lora").outputs["lora"]
        learned = dict(case=case, prompt_embedding=prompt_embedding, lora=lora, seed=seed, **model)

        with dsl.If(mode == "auto", name="mode-auto"):
            att = _gpu(attention_op(case=case, **model), profile, "attention").outputs["attention_map"]
            auto_mask = _cpu(mask(case=case, attention_map=att, threshold=threshold), profile,
                             "mask (attention)").outputs["edit_mask"]
            auto_gen = _gpu(generate(**learned, edit_mask=auto_mask), profile, "generate").outputs["edited"]
            auto = _cpu(summarize(case=case, edited=auto_gen, edit_mask=auto_mask, attention_map=att,
                                  output_uri=output_uri, case_id=case_id), profile, "summary", cache=False)
        with dsl.Elif(mode == "mask", name="mode-mask"):
            user_mask = _cpu(mask(case=case, threshold=threshold), profile, "mask (user)").outputs["edit_mask"]
            mask_gen = _gpu(generate(**learned, edit_mask=user_mask), profile, "generate").outputs["edited"]
            masked = _cpu(summarize(case=case, edited=mask_gen, edit_mask=user_mask, output_uri=output_uri,
                                    case_id=case_id), profile, "summary", cache=False)
        with dsl.Else(name="mode-whole"):
            # prepare has validated `mode`, so this branch is mode whole.
            whole_gen = _gpu(generate(**learned), profile, "generate").outputs["edited"]
            whole = _cpu(summarize(case=case, edited=whole_gen, output_uri=output_uri, case_id=case_id), profile,
                         "summary", cache=False)
        return dsl.OneOf(auto.outputs["Output"], masked.outputs["Output"], whole.outputs["Output"])

    return edit
