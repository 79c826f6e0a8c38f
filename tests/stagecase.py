"""A tiny-preset model and edit case for tests of the training and generation stages (CPU, well under a second)."""

from __future__ import annotations

import json

import torch

from editinfinity.demo import example_dir
from editinfinity.edit.case import CaseSpec
from editinfinity.edit.prepare import CaseData, prepare_case
from editinfinity.models.bundle import ModelBundle, load_models


def tiny_models_and_case(mode: str = "auto") -> tuple[ModelBundle, CaseData]:
    """The tiny preset with every block made to matter (its random init is near identity), and the bundled
    example prepared at 0.06M (source and edit prompts differ; styled and plain prompts differ)."""
    models = load_models("tiny", device="cpu")
    torch.manual_seed(0)
    models.transformer.init_weights(aln_init=1.0, aln_gamma_init=1.0, head_scale=1.0)
    ex = example_dir()
    spec = json.loads((ex / "case.json").read_text())
    case = prepare_case(models, CaseSpec(image=str(ex / spec["image"]), prompt=spec["prompt"],
                                         edit_prompt=spec["edit_prompt"], mode=mode,
                                         target_word=spec["target_word"] if mode == "auto" else None,
                                         resolution="0.06M"))
    return models, case


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors present in ``model`` now, named as in peft's state dict (adapter name dropped)."""
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
