"""Stage C, LoRA: with the learned rows frozen, adapt every block's FFN (fc1, fc2) to reconstruct the image.

LoRA comes from ``peft`` (rank 4, alpha 32, dropout 0.1 on the LoRA input, Kaiming-uniform A / zero B — the same
maths as the reference's ``LoRALinear``). Adapters are saved in peft's format (``adapter_config.json`` +
``adapter_model.safetensors`` with ``base_model.model.`` keys) and loaded strictly. The model object is shared
by every stage of a process, so adapters are injected for the duration of a ``with`` block and removed after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from ..errors import CheckpointError, StageError
from ..models.bundle import ModelBundle
from ..models.infinity import TextConditionCache
from ..models.text import TextFeatures
from .artifacts import read_stage, read_tensors, stage_output
from .prepare import CaseData, load_case, require_models
from .prompt_tuning import load_embedding
from .settings import EditSettings
from .training import (
    learning_rate,
    make_generator,
    on_device,
    optimize,
    stage_checkpoint_blocks,
    styled_text,
    teacher_forcing_inputs,
    training_mode,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."
TARGETS = ["fc1", "fc2"]

log = logging.getLogger(__name__)


def lora_config(settings: EditSettings) -> LoraConfig:
    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=TARGETS, init_lora_weights=True, bias="none")


def remove_lora(model: torch.nn.Module) -> None:
    """Put every wrapped Linear back (unmerged), leaving the base weights untouched."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if "peft_config" in vars(model):  # left by inject_adapter_in_model; a stale one makes peft warn next time
        del model.peft_config


@contextlib.contextmanager
def _float32_targets(model: torch.nn.Module, targets: list[str]):
    """peft initialises new adapters in float32, then moves them to the base layer's dtype: on a bf16 frozen base
    that would round the seeded initialisation. While injecting, the target layers show float32 placeholder weights
    (same device) so the adapters are created exactly as on a float32 base; the real weights come back after."""
    swapped = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in targets and m.weight.dtype != torch.float32:
            swapped.append((m, m.weight.data))
            m.weight.data = torch.empty(0, dtype=torch.float32, device=m.weight.device)
    try:
        yield
    finally:
        for m, weight in swapped:
            m.weight.data = weight


@contextlib.contextmanager
def lora_adapter(model: torch.nn.Module, config: LoraConfig, state: dict | None = None, *, seed: int = 0):
    """Inject a LoRA adapter (fresh, seeded init; or ``state`` loaded strictly) for the block's duration.

    Adapter parameters are float32 whatever the base weights' dtype (the optimizer updates them in float32), and
    a fresh adapter's initial values do not depend on that dtype. The adapter's input is not cast to float32
    (peft's default): under bf16 autocast its matmuls run in bf16 anyway, and the cast only cost a float32 copy
    of the FFN activations.
    """
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            with _float32_targets(model, sorted(config.target_modules)):
                inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        except Exception:  # a peft that reads the base weights while injecting: plain injection instead
            log.warning("LoRA injection with float32 placeholders failed; injecting on the base dtype", exc_info=True)
            remove_lora(model)
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # peft builds the adapter's modules (its dropout included) in train mode; give them the model's mode, so an
    # adapter applied to a model in eval mode (generation) runs without LoRA dropout, as the reference's inference
    # does, and the same seed gives the same pixels. The training stages switch the model to train mode themselves.
    model.train(model.training)
    try:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        for module in model.modules():
            if isinstance(module, LoraLayer) and hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
        if state is not None:
            expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
            got = set(state)
            if expected != got:
                raise CheckpointError(
                    f"LoRA adapter does not match the model: missing {sorted(expected - got)[:6]}, "
                    f"unexpected {sorted(got - expected)[:6]}; train it with the same preset and rank")
            result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
            if getattr(result, "unexpected_keys", None):
                raise CheckpointError(f"LoRA adapter has unexpected keys {result.unexpected_keys[:6]}")
        yield model
    finally:
        remove_lora(model)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_text(models: ModelBundle, case: CaseData, rows: torch.Tensor, settings: EditSettings) -> TextFeatures:
    """The LoRA stage's text batch: the styled source prompt with the learned rows, ``lora_batch`` times."""
    return styled_text(case, "source_styled", rows, models.device).repeat(settings.lora_batch)


def lora_loss(models: ModelBundle, case: CaseData, rows: torch.Tensor, settings: EditSettings,
              generator: torch.Generator, text_cache: TextConditionCache | None = None) -> torch.Tensor:
    """The stage-C objective: reweighted bitwise CE + kl_weight x summed bit CE, over ``lora_batch`` noisy copies.

    ``text_cache`` (a :class:`TextConditionCache` of :func:`lora_text`) skips the frozen text path; same result.
    """
    gt_bits, x_in = teacher_forcing_inputs(models, case, settings, generator, batch=settings.lora_batch)
    text = text_cache.text if text_cache is not None else lora_text(models, case, rows, settings)
    with models.autocast():
        logits = models.transformer(text, x_in, case.schedule, generator=generator, text_cache=text_cache)
    logits = logits.float()
    loss = models.transformer.bit_loss(logits, gt_bits, case.schedule)
    if settings.kl_weight:
        loss = loss + settings.kl_weight * models.transformer.summed_bit_ce(logits, gt_bits)
    return loss


def train_lora_adapter(models: ModelBundle, case: CaseData, rows: torch.Tensor, settings: EditSettings | None = None,
                       progress: bool = True, info: dict | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the adapter for ``settings.lora_iters`` updates; returns (peft state dict on CPU, losses).

    The text path runs once (:class:`TextConditionCache`). ``info``, when given, receives ``checkpoint_blocks``.
    """
    settings = settings or EditSettings()
    gen = make_generator(models.device, settings.seed)
    case = on_device(case, models.device, ["source_styled"])
    rows = rows.to(models.device)
    n_ckpt = stage_checkpoint_blocks(models, case, settings, batch=settings.lora_batch)
    if info is not None:
        info["checkpoint_blocks"] = n_ckpt
    with lora_adapter(models.transformer, lora_config(settings), seed=settings.seed) as model:
        params = lora_parameters(model)
        cache = TextConditionCache(model, lora_text(models, case, rows, settings))
        # peft's LoRA dropout draws from the global RNG: seed it from the settings inside a forked RNG, so a run
        # does not depend on (or disturb) what the process drew before.
        cuda = [models.device] if models.device.type == "cuda" else []
        with training_mode(model, settings, checkpoint_blocks=n_ckpt), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(settings.seed + 1)
            losses = optimize(params, lambda _: lora_loss(models, case, rows, settings, gen, cache),
                              settings.lora_iters, settings, "LoRA", progress, lr=learning_rate(settings, models))
        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
    return state, losses


def save_adapter(state: dict[str, torch.Tensor], directory: Path, settings: EditSettings) -> None:
    """peft's on-disk format, loadable with ``PeftModel.from_pretrained`` as well as by :func:`load_adapter`."""
    save_file({PEFT_PREFIX + k: v for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    cfg = lora_config(settings).to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


def load_adapter(lora_dir: str | Path, run_id: str | None = None) -> tuple[dict[str, torch.Tensor], EditSettings]:
    """Read an adapter directory strictly; returns (state dict without the peft prefix, settings with its rank)."""
    read_stage(lora_dir, "train_lora", run_id=run_id, needed_by="this stage")
    lora_dir = Path(lora_dir)
    try:
        raw = dict(read_tensors(lora_dir / ADAPTER_WEIGHTS, "train-lora"))
        cfg = json.loads((lora_dir / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"LoRA directory {lora_dir} is incomplete ({exc}); re-run train-lora") from exc
    bad = [k for k in raw if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise CheckpointError(f"{lora_dir / ADAPTER_WEIGHTS} has keys outside peft's format: {bad[:5]}")
    settings = EditSettings(lora_rank=int(cfg["r"]), lora_alpha=int(cfg["lora_alpha"]),
                            lora_dropout=float(cfg["lora_dropout"]))
    return {k[len(PEFT_PREFIX):]: v for k, v in raw.items()}, settings


def train_lora(case_dir, prompt_dir, out_dir, *, iters: int = 50, seed: int = 0, models: ModelBundle | None = None,
               settings: EditSettings | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Stage C over files: reads the case and the prompt embedding, writes the peft adapter directory."""
    from ..models.bundle import load_models

    case = load_case(case_dir)
    rows = load_embedding(prompt_dir, run_id=case.run_id)
    models = models or load_models(case.preset)
    identity = require_models(case, models, stage="train-lora")
    started = time.perf_counter()  # after loading: the stage's own work
    settings = dataclasses.replace(settings or EditSettings(), lora_iters=iters, seed=seed)  # caller's untouched
    info: dict = {}
    state, losses = train_lora_adapter(models, case, rows, settings, progress, info=info)
    with stage_output(out_dir, "train_lora", run_id=case.run_id, overwrite=overwrite, started=started,
                      settings=settings.stage_dict()) as (tmp, record):
        save_adapter(state, tmp, settings)
        record["models"] = identity
        record["losses"] = losses
        record["lr"] = learning_rate(settings, models)
        record.update(info)
    return Path(out_dir)
