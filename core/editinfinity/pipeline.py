"""``EditInfinityPipeline``: the method as a diffusers pipeline (components vae, transformer, text_encoder, tokenizer).

```python
pipe = EditInfinityPipeline.from_pretrained("weights/infinity-2b")        # written by `editinfinity convert`
pipe = EditInfinityPipeline.from_preset("toy")                            # bundled toy model / tiny random one
out = pipe.edit(image, "a red circle on a gray background", "a green circle on a gray background",
                target_word="circle")
out.image.save("edited.png")
learned = pipe.learn(image, "a red circle on a gray background")   # once per image
out = pipe.edit(edit_prompt="a blue circle on a gray background", target_word="circle", learned=learned)
```
It runs the same in-memory stage functions as the CLI and the KFP components.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from .edit.attention import attention_map
from .edit.case import CaseSpec
from .edit.generate import generate_edit
from .edit.learned import (
    LearnedState,
    check_compatible,
    edit_case,
    edit_settings,
    edit_spec,
    learn,
    load_learned,
    training_steps,
)
from .edit.mask import AUTO_BAND
from .edit.masking import band_weights, edit_weights
from .edit.modes import infer_mode
from .edit.prepare import CaseData, prepare_case
from .edit.sequence import StageTimer, Steps, run_stages
from .edit.settings import EditSettings
from .errors import InvalidCaseError
from .models.bsq_vae import BSQVAE  # noqa: F401  (imported so from_pretrained can resolve the component classes)
from .models.bundle import ModelBundle, load_models
from .models.infinity import Infinity  # noqa: F401


@dataclass
class EditOutput:
    """The edited image and every intermediate artifact of one edit."""

    image: Image.Image
    reconstruction: Image.Image
    case: CaseData
    prompt_embedding: torch.Tensor
    lora_state: dict
    attention: torch.Tensor | None = None
    edit_mask: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    losses: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # edit.sequence timing keys, as summary.json "seconds"


class EditInfinityPipeline(DiffusionPipeline):
    """Text-guided image editing that keeps the background (EditInfinity on Infinity)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, vae, transformer, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer)
        self.preset = "pretrained"

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> EditInfinityPipeline:
        pipe = cls(vae=bundle.vae, transformer=bundle.transformer, text_encoder=bundle.text_encoder,
                   tokenizer=bundle.tokenizer)
        pipe.preset = bundle.preset
        return pipe

    @classmethod
    def from_preset(cls, preset: str | None = None, *, weights: str | None = None,
                    device: str | None = None) -> EditInfinityPipeline:
        return cls.from_bundle(load_models(preset, weights=weights, device=device))

    def bundle(self) -> ModelBundle:
        for m in (self.vae, self.transformer, self.text_encoder):
            m.eval().requires_grad_(False)
        return ModelBundle(vae=self.vae, transformer=self.transformer, tokenizer=self.tokenizer,
                           text_encoder=self.text_encoder, device=self.transformer.device, preset=self.preset,
                           source="pipeline")

    def learn(self, image: Image.Image | str, prompt: str, *, resolution: str | None = None,
              settings: EditSettings | None = None, progress: bool = True, **overrides) -> LearnedState:
        """Learn ``image`` once (prompt tuning + LoRA) for any number of ``edit(learned=...)`` calls; save it with
        :func:`editinfinity.edit.learned.save_learned`, read it back with ``load_learned``."""
        settings = settings or EditSettings.from_profile("default", **overrides)
        return learn(self.bundle(), image, prompt, resolution=resolution, settings=settings, progress=progress)

    def edit(self, image: Image.Image | str | None = None, prompt: str | None = None, edit_prompt: str | None = None,
             *, target_word: str | None = None, mask: str | None = None, mask_polarity: str = "white-edit",
             resolution: str | None = None, settings: EditSettings | None = None, progress: bool = True,
             learned: LearnedState | str | None = None, **overrides) -> EditOutput:
        """Edit ``image``: automatic mask (``target_word``), user mask (``mask``) or whole image (neither).

        ``learned`` (from :meth:`learn`, or a learned folder) replaces ``image`` and ``prompt`` and skips the
        training: the same pixels as the one-shot edit with the same settings. ``overrides`` then change only
        edit settings (mask, sampling, seed of the sampling).
        """
        from .models.presets import default_resolution

        mode = infer_mode(mask=mask, target_word=target_word)
        models = self.bundle()
        losses: dict = {}
        if learned is not None:
            if image is not None or prompt is not None:
                raise InvalidCaseError("edit(learned=...) takes the image and the prompt from the learned state; "
                                       "pass only edit_prompt")
            state = load_learned(learned) if not isinstance(learned, LearnedState) else learned
            settings = settings or edit_settings(state, overrides)
            check_compatible(state, models, settings)
            spec = edit_spec(state, edit_prompt=edit_prompt, mode=mode, target_word=target_word, mask=mask,
                             mask_polarity=mask_polarity)
            losses.update(state.losses)
        else:
            settings = settings or EditSettings.from_profile("default", **overrides)
            spec = CaseSpec(image=image, prompt=prompt, edit_prompt=edit_prompt, mode=mode, target_word=target_word,
                            mask=mask, mask_polarity=mask_polarity,
                            resolution=resolution or default_resolution(self.preset))

        # The steps in memory (edit.sequence runs them in order, for the modes that have them).
        def mask_weights(case, amap):
            return edit_weights(case, amap, settings.threshold, settings.band, settings.core,
                                fill_holes=settings.fill_holes, min_region=settings.min_region)

        def generate(case, rows, lora_state, mask_and_weights):
            weights = None
            if mask_and_weights is not None:  # band "auto": one keep-weight map per candidate band
                edit, weights = mask_and_weights
                weights = band_weights(case, edit, settings.band) if settings.band == AUTO_BAND else weights
            return generate_edit(models, case, rows, lora_state, weights, settings)

        later = {"attention": lambda case: attention_map(models, case), "mask": mask_weights, "generate": generate}
        if learned is not None:
            steps = Steps(prepare=lambda: (edit_case(models, state, spec, settings), state.rows, state.adapter),
                          learned=True, **later)
        else:
            steps = Steps(prepare=lambda: prepare_case(models, spec, settings),
                          **training_steps(models, settings, progress, losses), **later)
        timer = StageTimer(models, release_memory=settings.low_memory)
        out = run_stages(steps, mode=mode, timer=timer)
        edit_mask, weights = out.mask if out.mask is not None else (None, None)
        weights = out.generate.weights if out.generate.weights is not None else weights  # the band kept
        return EditOutput(image=out.generate.edited, reconstruction=out.generate.reconstruction, case=out.case,
                          prompt_embedding=out.prompt, lora_state=out.lora, attention=out.attention,
                          edit_mask=edit_mask, weights=weights, losses=losses, seconds=timer.record())

    __call__ = edit
