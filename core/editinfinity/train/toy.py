"""Train the ``toy`` preset end to end: the BSQ VAE, then the transformer and its T5, each within a time budget.

    python -m editinfinity.train.toy --out build/toy --vae-minutes 3 --transformer-minutes 7 --device cuda

``OUT`` gets the layout ``load_models(weights=OUT)`` reads — ``vae/`` and ``transformer/`` (float16 safetensors,
which ``from_pretrained`` upcasts to float32), ``text_encoder/`` (float32: ``transformers`` would otherwise load a
float16 T5), ``tokenizer/`` (the bundled toy-world tokenizer), ``model_index.json`` — plus ``training.json``
(configs, steps, losses, seconds, hardware, checks) and ``MODEL_CARD.md``. Files appear as soon as they exist:
the VAE right after its phase, the transformer at every checkpoint, so an interrupted run still leaves a loadable
directory. Training state (optimizer, checkpoints, logs) lives in ``--work`` (default ``OUT.work``); ``--resume``
continues from it, ``--phase vae`` / ``--phase transformer`` run one phase per call, and ``--extend`` trains a
finished phase for another budget (e.g. when the VAE's held-out PSNR is short of the target).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import EditInfinityError, InvalidCaseError
from . import common
from .options import TRANSFORMER_CONFIG, VAE_CONFIG, add_toy_arguments  # noqa: F401  (re-exported)
from .transformer import TransformerConfig, train_transformer
from .vae import VAEConfig, heldout_psnr, train_vae

log = logging.getLogger(__name__)

#: Upper bound on the shipped weights (every ``*.safetensors`` file of the output directory).
MAX_WEIGHT_BYTES = 40 * 1024 * 1024


def _config_path(given: str | None, default: Path) -> Path | None:
    if given:
        return Path(given)
    return default if default.is_file() else None


def load_configs(args: argparse.Namespace) -> tuple[VAEConfig, TransformerConfig]:
    """The two configs: YAML file, then ``--*-set`` overrides, then the minute/step/worker flags."""
    vae_over = common.parse_overrides(args.vae_set)
    tr_over = common.parse_overrides(args.transformer_set)
    for over, minutes, steps in ((vae_over, args.vae_minutes, args.vae_steps),
                                 (tr_over, args.transformer_minutes, args.transformer_steps)):
        if minutes is not None:
            over["minutes"] = minutes
        if steps is not None:
            over["steps"] = steps
        if args.workers is not None:
            over["workers"] = args.workers
    if args.init_from:
        tr_over["init_from"] = str(args.init_from)
    if args.vae_decoder_minutes is not None:
        if not args.vae_from:
            raise InvalidCaseError("--vae-decoder-minutes fine-tunes the decoder of --vae-from DIR; give --vae-from")
        vae_over.update(init_from=str(args.vae_from), train_encoder=False, minutes=args.vae_decoder_minutes)
    vae_cfg = common.load_config(VAEConfig, _config_path(args.vae_config, VAE_CONFIG), vae_over)
    tr_cfg = common.load_config(TransformerConfig, _config_path(args.transformer_config, TRANSFORMER_CONFIG), tr_over)
    if vae_cfg.image_size != tr_cfg.image_size:
        raise InvalidCaseError(f"the VAE config trains on {vae_cfg.image_size}px pictures but the transformer "
                               f"config on {tr_cfg.image_size}px; use one size")
    return vae_cfg, tr_cfg


# ---------------------------------------------------------------------------------------------------------------
# export


def export_diffusers_fp16(model, out_dir: Path) -> Path:
    """``save_pretrained`` layout (config + ``diffusion_pytorch_model.safetensors``) with float16 tensors.

    ``ModelMixin.from_pretrained`` builds the model in float32 and copies the float16 values in, so a plain load
    gives a float32 model.
    """
    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        model.save_config(tmp)
        sd = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
              for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    return common.save_dir(Path(out_dir), write)


def export_text_encoder(encoder, out_dir: Path) -> Path:
    """``T5EncoderModel.save_pretrained`` in float32 (a float16 file would load as float16 with transformers 5)."""
    return common.save_dir(Path(out_dir), copy.deepcopy(encoder).to("cpu", torch.float32).save_pretrained)


def export_shared(out: Path) -> None:
    """Tokenizer copy and ``model_index.json`` (written once, before any weights)."""
    from ..models.bundle import bundled_tokenizer_dir
    from ..models.checkpoints import write_model_index

    out.mkdir(parents=True, exist_ok=True)
    tok = out / "tokenizer"
    if not tok.is_dir():
        # copied with the package's modes, made the umask's by save_dir
        common.save_dir(tok, lambda tmp: shutil.copytree(bundled_tokenizer_dir(), tmp))
    write_model_index(out, preset="toy")


def weight_bytes(out: Path) -> dict[str, int]:
    """Size of every shipped safetensors file, by path relative to ``out``."""
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(Path(out).rglob("*.safetensors"))}


# ---------------------------------------------------------------------------------------------------------------
# record


class Record:
    """``training.json``, rewritten after every phase so the directory always says what it holds."""

    def __init__(self, out: Path, resume: bool):
        self.path = Path(out) / "training.json"
        self.data: dict[str, Any] = {}
        if resume and self.path.is_file():
            self.data = json.loads(self.path.read_text())
        command = " ".join(sys.argv)
        earlier = [c for c in self.data.get("commands", [self.data.get("command")]) if c]
        self.data.update({"preset": "toy", "editinfinity": __version__, "hardware": common.hardware(),
                          "command": command, "commands": [*earlier, command]})

    def update(self, **kw: Any) -> None:
        """Add or replace top-level entries and rewrite the file."""
        self.data.update(kw)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def _phase_record(result, run_dir: Path, cfg) -> dict[str, Any]:
    rec: dict[str, Any] = {"config": common.config_dict(cfg), "steps": result.steps,
                           "seconds": round(result.seconds, 1), "final": result.final_losses}
    hist = result.history
    if hist:
        rec["steps_per_s"] = round(sum(h.get("steps_per_s", 0) for h in hist) / len(hist), 3)
        rec["loss_curve"] = [{k: h[k] for k in ("step", "elapsed", "loss") if k in h} for h in hist]
    rec["log"] = str(run_dir / "log.jsonl")
    return rec


def lineage(weights_dir: Path) -> dict[str, Any] | None:
    """What the transformer in ``weights_dir`` (an ``--init-from`` source) had been trained for, from the
    ``training.json`` beside it: its own run plus everything it had been started from."""
    path = weights_dir / "training.json"
    if not path.is_file():
        return None
    before = json.loads(path.read_text())
    prev = before.get("transformer", {})
    earlier = prev.get("started_from") or {}
    # The source's own commands, after those of the weights it was itself started from (chained --init-from runs
    # keep their whole history; a command already listed is not repeated).
    own = before.get("commands") or [before.get("command")]
    commands = [c for c in dict.fromkeys([*(earlier.get("commands") or []), *own]) if c]
    return {"steps": prev.get("steps"), "seconds": prev.get("seconds"),
            "total_steps": earlier.get("total_steps", 0) + (prev.get("steps") or 0),
            "total_seconds": round(earlier.get("total_seconds", 0) + (prev.get("seconds") or 0), 1),
            "commands": commands}


def progress_record(run_dir: Path, cfg, started_from: dict[str, Any] | None) -> dict[str, Any]:
    """The ``transformer`` entry of ``training.json`` while the run is under way: its steps and training seconds at
    the last checkpoint, so that the weights exported with that checkpoint keep their lineage (:func:`lineage`)
    when a run is cut short and a later run starts from them."""
    ckpt = common.find_checkpoint(run_dir)
    meta = json.loads((ckpt / common.META_FILE).read_text()) if ckpt is not None else {}
    rec: dict[str, Any] = {"config": common.config_dict(cfg), "steps": meta.get("step", 0),
                           "seconds": round(float(meta.get("elapsed", 0.0)), 1), "in_progress": True}
    if started_from:
        rec["started_from"] = started_from
    return rec


def use_existing_vae(vae_dir: Path, out: Path, device: torch.device, vae_cfg: VAEConfig,
                     check_images: int) -> dict[str, Any]:
    """``--vae-from``: export a trained VAE into ``out/vae`` and measure it, instead of training one."""
    from ..models.bsq_vae import BSQVAE
    from .data import heldout_scenes

    if not (vae_dir / "config.json").is_file():
        raise InvalidCaseError(f"--vae-from {vae_dir}: no VAE there (expected config.json and safetensors weights)")
    vae = BSQVAE.from_pretrained(str(vae_dir))
    if vae_dir.resolve() != (out / "vae").resolve():
        export_diffusers_fp16(vae, out / "vae")
    rec: dict[str, Any] = {"config": {"model": {k: v for k, v in vae.config.items() if not k.startswith("_")}},
                           "parameters": sum(p.numel() for p in vae.parameters())}
    earlier = vae_dir.parent / "training.json"  # the record of the run that trained it, when it sits beside
    if earlier.is_file():
        rec.update(json.loads(earlier.read_text()).get("vae", {}))
    rec["from"] = str(vae_dir)
    if check_images > 0:
        scenes = heldout_scenes(check_images, vae_cfg.image_size, vae_cfg.image_size)
        rec["heldout"] = heldout_psnr(vae.to(device).eval(), scenes, vae_cfg.schedule(), device)
        log.info("toy: VAE from %s, held-out PSNR %.2f dB", vae_dir, rec["heldout"]["mean_psnr"])
    return rec


def final_checks(out: Path, device: torch.device, vae_cfg: VAEConfig, check_images: int) -> dict[str, Any]:
    """Load ``out`` exactly as users will (``load_models(weights=out)``) and measure the held-out VAE PSNR."""
    from ..models.bundle import load_models
    from .data import heldout_scenes

    t0 = time.perf_counter()
    models = load_models("toy", weights=str(out), device=device)
    checks: dict[str, Any] = {"load_models": "ok", "dtypes": {
        "vae": str(next(models.vae.parameters()).dtype), "transformer": str(next(models.transformer.parameters()).dtype),
        "text_encoder": str(next(models.text_encoder.parameters()).dtype)}}
    if check_images > 0:
        scenes = heldout_scenes(check_images, vae_cfg.image_size, vae_cfg.image_size)
        checks["vae_psnr_exported"] = heldout_psnr(models.vae, scenes, vae_cfg.schedule(), device)
    checks["seconds"] = round(time.perf_counter() - t0, 1)
    return checks


MODEL_CARD = """# editinfinity `toy` model

A small Infinity-architecture model (BSQ VAE + bitwise next-scale transformer + tiny T5 encoder) trained from
scratch by `python -m editinfinity.train.toy` on the synthetic toy world of `editinfinity.toyworld`: flat-coloured
circles, squares and triangles (1 or 2 per picture, 9 palette colours) on a flat background, 256x256 pixels,
captioned `a {{colour}} {{shape}} [and a {{colour}} {{shape}}] on a {{colour}} background`. It exists so that the CPU
demo and the tests really edit pictures; it knows nothing outside this world.

## Components

| component | architecture | parameters | stored as |
| --- | --- | --- | --- |
| `vae/` | BSQVAE {vae_model}, 32 bits per 16x16 cell | {vae_params} | float16 safetensors (loads as float32) |
| `transformer/` | Infinity {tr_model} | {tr_params} | float16 safetensors (loads as float32) |
| `text_encoder/` | T5 encoder {t5_model}, trained jointly: {t5_trained} | {t5_params} | float32 safetensors |
| `tokenizer/` | SentencePiece unigram over the world's words (`toyworld.build_tokenizer`) | - | - |

Weights on disk: {weight_mb:.1f} MB in total.

## Training

- Data: random scenes rendered on the fly (`toyworld.sample_scene`), seeded per step; no external data. Seeds of
  the evaluation (`python -m editinfinity.evaluation.toy_eval`) are never drawn in training (see `editinfinity/train/data.py`).
- VAE: L1 + MSE reconstruction of the decode of the multi-scale quantised latent (0.06M schedule,
  straight-through BSQ), commitment 0.25; pixel noise std ~ U(0, {noise_max}); {vae_steps} steps of batch
  {vae_batch} in {vae_minutes:.1f} min.{vae_from}{vae_decoder}
- Transformer: teacher forcing with bitwise self-correction (strength {bsc}), scale-reweighted bitwise
  cross-entropy, condition dropout {cdr} (for classifier-free guidance), styled prompts and appended rows part of
  the time; {tr_steps} steps of batch {tr_batch} in {tr_minutes:.1f} min.{tr_from}
- Hardware: {hardware}. bf16 autocast on GPU.

## Checks at the end of training

{checks}

The full evaluation (held-out text-to-image accuracy, editing in all three modes) is `python -m editinfinity.evaluation.toy_eval`; its
results are in `bench/results/`.
"""

LIMITATIONS = """
## Limitations

Only the toy world's captions and pictures (256x256, the 0.06M schedule); other prompts tokenise to characters
and give meaningless pictures. Not a substitute for the official Infinity weights.
"""


def _started_from_text(tcfg: dict, tr: dict) -> str:
    if not tcfg.get("init_from"):
        return ""
    sf = tr.get("started_from") or {}
    if not sf:
        return f" Started from the weights in `{tcfg['init_from']}` (`--init-from`)."
    total_steps = sf.get("total_steps", 0) + (tr.get("steps") or 0)
    total_min = (sf.get("total_seconds", 0) + (tr.get("seconds") or 0)) / 60
    return (f" Started from the weights in `{tcfg['init_from']}` (`--init-from`), already trained for "
            f"{sf.get('total_steps')} steps: {total_steps} steps, {total_min:.1f} min in all (commands below).")


def _evaluation_lines(ev: dict[str, Any]) -> list[str]:
    """The ``evaluation`` entry of the record (a ``python -m editinfinity.evaluation.toy_eval`` JSON) as model-card lines."""
    lines = [f"`{ev.get('command', 'python -m editinfinity.evaluation.toy_eval')}` on {ev.get('gpu') or ev.get('device')}, seeds never "
             "used in training (targets from the toy-model issue in brackets):", ""]
    if ev.get("vae"):
        v = ev["vae"]
        lines.append(f"- VAE reconstruction: {v['mean_psnr']:.2f} dB mean PSNR on {v['images']} pictures, "
                     f"{100 * v['fraction_ge_30db']:.0f}% >= 30 dB [>= 30 dB].")
    t = ev.get("text_to_image") or {}
    if t.get("n"):
        by = t.get("by_objects", {})
        parts = ", ".join(f"{k} object{'s' if k != '1' else ''}: {100 * b['objects_ok_rate']:.0f}% of {b['n']}"
                          for k, b in sorted(by.items()))
        lines.append(f"- Text to image: every object's colour and shape as prompted in "
                     f"{100 * t['objects_ok_rate']:.1f}% of {t['n']} generations ({parts}; backgrounds "
                     f"{100 * t['background_ok_rate']:.0f}%) [>= 95%, two objects >= 90%].")
    for mode, name in (("auto", "automatic mask"), ("mask", "user mask"), ("whole", "whole image")):
        e = (ev.get("edits") or {}).get(mode) or {}
        if not e.get("n"):
            continue
        target = " [>= 92%, >= 30 dB; mask IoU >= 0.75]" if mode == "auto" else ""
        iou = f"; mask IoU with the true region {e['mask_iou_mean']:.2f} mean" if e.get("mask_iou_mean") else ""
        lines.append(f"- Editing, {name}, {e['n']} cases: requested attribute present in {100 * e['present_rate']:.1f}%; "
                     f"PSNR outside the dilated edit region {e['psnr_outside_mean']:.1f} dB mean, "
                     f"{e['psnr_outside_median']:.1f} dB median, {100 * e['psnr_outside_ge_30_rate']:.0f}% >= 30 dB"
                     f"{iou}{target}; {e['seconds_per_edit']:.1f} s per edit.")
    return lines


def write_model_card(out: Path, record: dict[str, Any]) -> None:
    """``MODEL_CARD.md`` from the training record."""
    vae, tr = record.get("vae", {}), record.get("transformer", {})
    vcfg, tcfg = vae.get("config", {}), tr.get("config", {})
    checks = record.get("checks", {})
    lines = []
    dec = vae.get("decoder_finetune") or {}
    if "heldout" in vae and vae["heldout"] and not dec:
        lines.append(f"- VAE reconstruction PSNR on {vae['heldout']['images']} held-out pictures (float32 weights): "
                     f"{vae['heldout']['mean_psnr']:.2f} dB mean, {vae['heldout']['min_psnr']:.2f} dB min.")
    if dec.get("heldout"):
        before = f" (before: {dec['before']['mean_psnr']:.2f} dB)" if dec.get("before") else ""
        lines.append(f"- VAE reconstruction PSNR on {dec['heldout']['images']} held-out pictures after the decoder-only "
                     f"fine-tuning: {dec['heldout']['mean_psnr']:.2f} dB mean{before}, "
                     f"{dec['heldout']['min_psnr']:.2f} dB min.")
    if "vae_psnr_exported" in checks:
        c = checks["vae_psnr_exported"]
        lines.append(f"- Same, shipped float16 weights: {c['mean_psnr']:.2f} dB mean.")
    if tr.get("samples"):
        s = tr["samples"]
        lines.append(f"- Text to image on {s['generations']} held-out captions (cfg {s['cfg']}, tau {s['tau']}): every "
                     f"object's colour and shape as prompted in {100 * s['objects_ok_rate']:.1f}%, exact match "
                     f"(background, no extra object) in {100 * s['matches_rate']:.1f}%.")
    hw = record.get("hardware", {})

    def num(d: dict, key: str) -> float:
        return float(d.get(key) or 0)

    text = MODEL_CARD.format(
        vae_model=vcfg.get("model", {}), vae_params=f"{num(vae, 'parameters') / 1e6:.2f}M",
        tr_model=tcfg.get("model", {}), tr_params=f"{num(tr, 'parameters') / 1e6:.2f}M",
        t5_model=tcfg.get("text_encoder", {}), t5_trained=tcfg.get("train_text_encoder"),
        t5_params=f"{num(tr, 'text_encoder_parameters') / 1e6:.2f}M",
        weight_mb=sum(record.get("weights", {}).get("bytes", {}).values()) / 2**20,
        noise_max=vcfg.get("noise_max"), vae_steps=vae.get("steps"), vae_batch=vcfg.get("batch_size"),
        vae_minutes=num(vae, "seconds") / 60,
        vae_decoder=(f" Then the decoder alone (encoder frozen, so the bit codes are unchanged) for {dec['steps']} steps "
                     f"of batch {dec.get('config', {}).get('batch_size')} in {dec['seconds'] / 60:.1f} min."
                     if dec else ""), bsc=tcfg.get("noise_strength"), cdr=tcfg.get("cond_drop_rate"),
        tr_steps=tr.get("steps"), tr_batch=tcfg.get("batch_size"), tr_minutes=num(tr, "seconds") / 60,
        hardware=hw.get("gpu", f"CPU ({hw.get('cpu_count')} cores)"),
        vae_from=f" Reused from `{vae['from']}` (`--vae-from`)." if vae.get("from") else "",
        tr_from=_started_from_text(tcfg, tr),
        checks="\n".join(lines) or "- (not run)")
    commands = record.get("commands") or [record.get("command")]
    started = (tr.get("started_from") or {}).get("commands") or []
    history = [c for c in dict.fromkeys([*started, *commands]) if c]
    if history:
        text += "\n## Commands, in order\n\n" + "\n".join(f"1. `{_short_command(c)}`" for c in history) + "\n"
    if record.get("evaluation"):
        text += "\n## Evaluation\n\n" + "\n".join(_evaluation_lines(record["evaluation"])) + "\n"
    if record.get("notes"):
        text += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in record["notes"]) + "\n"
    text += LIMITATIONS
    (Path(out) / "MODEL_CARD.md").write_text(text)


def _short_command(command: str) -> str:
    """``.../editinfinity/train/toy.py --out ...`` as the module invocation users type."""
    head, _, rest = command.partition(" ")
    if head.endswith("train/toy.py"):
        return f"python -m editinfinity.train.toy {rest}".strip()
    return command


# ---------------------------------------------------------------------------------------------------------------
# driver


#: What the driver writes at the top of ``--out`` (``train.log``: where the shipped preset's log was kept) and of
#: ``--work``: a non-empty folder holding none of these is not ours and is refused; ``--overwrite`` removes only a
#: folder holding nothing else.
OUT_NAMES = ("vae", "transformer", "text_encoder", "tokenizer", "model_index.json", "training.json", "MODEL_CARD.md",
             "train.log")
WORK_NAMES = ("vae", "transformer", "vae-decoder")


def check_folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """``--out`` and ``--work`` checked (see ``OUT_NAMES``), and removed first with ``--overwrite``."""
    from ..file_outputs import check_training_folder

    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + ".work")
    inputs = (args.vae_from, args.init_from)
    for remove in ((False, True) if args.overwrite else (False,)):
        out = check_training_folder(out, flag="--out", ours=OUT_NAMES, overwrite=args.overwrite, remove=remove,
                                    inputs=inputs)
        work = check_training_folder(work, flag="--work", ours=WORK_NAMES, overwrite=args.overwrite, remove=remove,
                                     inputs=inputs)
    return out, work


def run(args: argparse.Namespace) -> int:
    """Run the phases ``args`` asks for; returns the exit code (1 when the weights exceed 40 MB)."""
    out, work = check_folders(args)
    vae_cfg, tr_cfg = load_configs(args)
    device = common.resolve_device(args.device)
    work.mkdir(parents=True, exist_ok=True)
    export_shared(out)
    decoder_only = args.vae_decoder_minutes is not None
    started_from = lineage(Path(tr_cfg.init_from)) if tr_cfg.init_from else None  # read before OUT is rewritten
    record = Record(out, resume=args.resume or args.extend or args.phase == "transformer" or decoder_only)
    log.info("toy training on %s: %s", device, json.dumps(common.hardware()))
    t_start = time.perf_counter()
    vae_run, tr_run = work / "vae", work / "transformer"

    if args.vae_from and not decoder_only:
        vae_dir = Path(args.vae_from)
        record.update(vae=use_existing_vae(vae_dir, out, device, vae_cfg, args.check_images))
    elif args.phase in ("all", "vae"):
        if decoder_only:
            vae_run = work / "vae-decoder"
        res = train_vae(vae_cfg, vae_run, device=device, resume=args.resume or args.extend, extend=args.extend,
                        progress=args.progress)
        if not (res.model_dir / "config.json").is_file():
            raise RuntimeError(f"the VAE run in {vae_run} did not finish; run again with --resume")
        from ..models.bsq_vae import BSQVAE

        export_diffusers_fp16(BSQVAE.from_pretrained(str(res.model_dir)), out / "vae")
        rec = _phase_record(res, vae_run, vae_cfg)
        rec["heldout"] = res.heldout
        rec["parameters"] = json.loads((vae_run / "result.json").read_text()).get("parameters")
        if decoder_only:
            earlier = record.data.get("vae") or {}
            rec["before"] = earlier.get("heldout")
            rec = {**earlier, "decoder_finetune": rec}
        record.update(vae=rec)
        log.info("toy: VAE exported to %s", out / "vae")
        if (args.phase == "vae" and not decoder_only and (args.extend or not args.resume)
                and common.find_checkpoint(tr_run) is not None):
            log.warning("toy: %s holds a transformer trained against the previous VAE codes; train it again "
                        "(a new --work directory, or delete %s) before shipping", tr_run, tr_run)

    if args.phase in ("all", "transformer"):
        vae_dir = Path(args.vae_from) if args.vae_from and not decoder_only else vae_run / "vae"
        if not (vae_dir / "config.json").is_file():
            raise InvalidCaseError(f"no trained VAE in {vae_dir}; run the VAE phase first (--phase vae)")

        def on_save(transformer, text_encoder, final: bool) -> None:
            export_diffusers_fp16(transformer, out / "transformer")
            export_text_encoder(text_encoder, out / "text_encoder")
            log.info("toy: %s transformer and text encoder exported to %s", "final" if final else "checkpoint", out)
            if not final:  # weights exported mid-run say what they were trained for (an --init-from source)
                record.update(transformer=progress_record(tr_run, tr_cfg, started_from))

        res = train_transformer(tr_cfg, tr_run, vae_dir, device=device, resume=args.resume or args.extend,
                                extend=args.extend, progress=args.progress, on_save=on_save)
        if not (res.transformer_dir / "config.json").is_file():
            raise RuntimeError(f"the transformer run in {tr_run} did not finish; run again with --resume")
        rec = _phase_record(res, tr_run, tr_cfg)
        result = json.loads((tr_run / "result.json").read_text())
        rec["samples"] = result.get("samples")
        rec["samples_by_cfg"] = result.get("samples_by_cfg")
        rec["parameters"] = result.get("parameters")
        rec["text_encoder_parameters"] = result.get("text_encoder_parameters")
        if started_from:
            rec["started_from"] = started_from
        record.update(transformer=rec)

    sizes = weight_bytes(out)
    total = sum(sizes.values())
    record.update(weights={"bytes": sizes, "total_bytes": total, "total_mb": round(total / 2**20, 2),
                           "limit_mb": MAX_WEIGHT_BYTES / 2**20,
                           "dtypes": {"vae": "float16", "transformer": "float16", "text_encoder": "float32"}},
                  seconds={**record.data.get("seconds", {}), args.phase: round(time.perf_counter() - t_start, 1)})
    complete = all((out / d / "config.json").is_file() for d in ("vae", "transformer", "text_encoder"))
    if complete:
        record.update(checks=final_checks(out, device, vae_cfg, args.check_images))
        log.info("toy: checks %s", json.dumps(record.data["checks"]))
    write_model_card(out, record.data)
    log.info("toy: wrote %s (%.1f MB of weights) in %.0f s", out, total / 2**20, time.perf_counter() - t_start)
    if total > MAX_WEIGHT_BYTES:
        log.error("toy: the weights take %.1f MB, over the %.0f MB limit; use a smaller model config",
                  total / 2**20, MAX_WEIGHT_BYTES / 2**20)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The driver's command line."""
    return add_toy_arguments(argparse.ArgumentParser(prog="python -m editinfinity.train.toy", description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))


def setup_logging(verbose: bool = True) -> None:
    """Progress lines on stderr (flushed per line, so they stream through pipes)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m editinfinity.train.toy``: returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return run(args)
    except EditInfinityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
