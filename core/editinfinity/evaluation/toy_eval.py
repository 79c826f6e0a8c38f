"""Evaluation of the trained `toy` model on seeds never used in training (model-free judge: toyworld.analyse).

    python -m editinfinity.evaluation.toy_eval --weights build/toy --device cuda --out bench/results/toy_eval_h200.json
    python -m editinfinity.evaluation.toy_eval --limit 2 --prompt-iters 2 --lora-iters 2 --out /tmp/toy_eval.json   # smoke run
    # mask cleanup variants (each case learned once, edited with every variant), 4 processes, then merged:
    python -m editinfinity.evaluation.toy_eval --variant holes:fill_holes=1 --variant small:min_region=0.008 --shard 0/4 ...
    python -m editinfinity.evaluation.toy_eval --merge shard0.json shard1.json shard2.json shard3.json --out toy_eval.json

``--out`` must not exist: ``--overwrite`` replaces only an earlier report of this evaluation (a JSON object with its
``command``, ``targets`` and ``weights``), never another file or a ``--merge`` input. The report is rewritten
(atomically) after every section, so a run cut short keeps what it measured.

Targets: VAE reconstruction PSNR >= 30 dB on 200 held-out pictures; text to image: every object's colour and
shape as prompted in >= 95% of 200 generations (>= 90% of those with two objects); automatic-mask editing of 100
cases that change one object's colour or shape: the edited object (new colour and kind) present in >= 92%, mask IoU
with the true region >= 0.75 on average (on the latent grid: the cells at least 20% covered, the rule the method
applies to a user mask; the any-pixel IoU of earlier reports is kept as ``mask_iou_any_pixel``), and outside the true edit region dilated by one
latent cell PSNR >= 30 dB against the source. User-mask (the true region as the mask) and
whole-image modes are reported on a subset. ``--limit N`` caps every count (quick runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from editinfinity import __version__
from editinfinity.edit.settings import EditSettings
from editinfinity.errors import InvalidCaseError
from editinfinity.evaluation.toy_judge import edit_cases, edit_eval, summarise_edits, text_to_image_eval
from editinfinity.file_outputs import claim_report
from editinfinity.models.bundle import load_models
from editinfinity.models.presets import mask_threshold_for
from editinfinity.models.schedules import get_schedule
from editinfinity.pipeline import EditInfinityPipeline
from editinfinity.train.data import SEED_SETS, heldout_scenes
from editinfinity.train.vae import heldout_psnr

#: The keys every report of this evaluation holds (what ``--overwrite`` may replace).
REPORT_KEYS = ("command", "targets", "weights")
TARGETS = {"vae_psnr_db": 30.0, "text_to_image_objects_ok": 0.95, "text_to_image_two_objects_ok": 0.90,
           "edit_auto_present": 0.92, "edit_auto_mask_iou": 0.75, "edit_auto_psnr_outside_db": 30.0}


def _strip(summary: dict, keep_cases: bool) -> dict:
    if keep_cases:
        return summary
    return {k: v for k, v in summary.items() if not (k in ("cases", "results") and isinstance(v, list))}


def passed(report: dict) -> dict[str, bool | None]:
    """Each target met (True/False), or None where its section did not run."""
    vae, t2i = report.get("vae"), report.get("text_to_image")
    auto = report.get("edits", {}).get("auto") or {}
    ran = bool(auto.get("cases"))
    two = ((t2i or {}).get("by_objects") or {}).get("2") or {}
    return {
        "vae_psnr": None if vae is None else vae["mean_psnr"] >= TARGETS["vae_psnr_db"],
        "text_to_image": None if t2i is None else t2i["objects_ok_rate"] >= TARGETS["text_to_image_objects_ok"],
        "text_to_image_two_objects": None if not two.get("n") else
        two["objects_ok_rate"] >= TARGETS["text_to_image_two_objects_ok"],
        "edit_auto_present": auto["present_rate"] >= TARGETS["edit_auto_present"] if ran else None,
        "edit_auto_mask_iou": auto["mask_iou_mean"] >= TARGETS["edit_auto_mask_iou"] if ran else None,
        "edit_auto_psnr_outside": auto["psnr_outside_mean"] >= TARGETS["edit_auto_psnr_outside_db"] if ran else None,
    }


def parse_variant(text: str, settings: EditSettings) -> tuple[str, EditSettings, dict]:
    """``NAME:key=value,key=value`` -> (name, settings with those edit settings changed, the changes)."""
    name, _, body = text.partition(":")
    types = {f.name: type(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
    changes: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--variant {text}: unknown setting {key!r}")
        kind = types[key]
        if kind is type(None):  # a setting unset by default (threshold: the preset's): a number, else text
            kind = int if value.lstrip("-").isdigit() else float
            try:
                changes[key] = kind(value)
            except ValueError:
                changes[key] = value
            continue
        changes[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    if not name or not changes:
        raise SystemExit(f"--variant {text}: expected NAME:key=value[,key=value...]")
    out = dataclasses.replace(settings, **changes)
    out.validate()
    return name, out, changes


def merge(paths: list[str]) -> dict:
    """One report from shard reports (run with --keep-cases): cases pooled, summaries recomputed."""
    parts = []
    for p in paths:
        try:
            part = json.loads(Path(p).read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidCaseError(f"--merge {p}: cannot read it ({exc.strerror}); give the shard reports' paths") \
                from None
        except ValueError as exc:
            raise InvalidCaseError(f"--merge {p}: not JSON ({exc}); give the shard reports written by this "
                                   "evaluation") from None
        if not (isinstance(part, dict) and all(k in part for k in REPORT_KEYS)):
            raise InvalidCaseError(f"--merge {p} is not a report of this evaluation (no {', '.join(REPORT_KEYS)}); "
                                   "give the shard reports written with --keep-cases")
        parts.append(part)
    report = {k: v for k, v in parts[0].items() if k not in ("edits", "passed", "limited")}
    report["merged_from"] = [p.get("command") for p in parts]
    for key in ("vae", "text_to_image"):
        found = [p[key] for p in parts if key in p]
        if found:
            report[key] = found[0]
    report["seconds"] = {"by_shard": [p.get("seconds") for p in parts]}
    report["edits"] = {}
    sections: dict[tuple, list] = {}
    for p in parts:
        for mode, sec in p.get("edits", {}).items():
            for name, summ in (sec.items() if mode.endswith("_variants") else [(None, sec)]):
                if "results" not in summ:
                    raise SystemExit(f"--merge needs reports written with --keep-cases ({mode} has no results)")
                sections.setdefault((mode, name), []).append(summ)
    for (mode, name), summs in sections.items():
        results = sorted((r for s in summs for r in s["results"]), key=lambda r: r.get("case", 0))
        merged = summarise_edits(results, summs[0]["mode"], sum(s["requested"] for s in summs),
                                 any(s["truncated"] for s in summs))
        if "settings" in summs[0]:
            merged["settings"] = summs[0]["settings"]
        if name is None:
            report["edits"][mode] = merged
        else:
            report["edits"].setdefault(mode, {})[name] = merged
    report["passed"] = passed(report)
    report["limited"] = any(s.get("truncated", False) for s in report["edits"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="weights directory (default: the toy preset's bundled weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results/toy_eval.json")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an earlier report of this evaluation (never another file)")
    ap.add_argument("--limit", type=int, help="cap every count below (quick runs)")
    ap.add_argument("--vae-images", type=int, default=200)
    ap.add_argument("--generations", type=int, default=200)
    ap.add_argument("--edits", type=int, default=100, help="automatic-mask edit cases")
    ap.add_argument("--mask-edits", type=int, default=20, help="user-mask edit cases (the first of the same cases)")
    ap.add_argument("--whole-edits", type=int, default=20, help="whole-image edit cases")
    ap.add_argument("--cfg", type=float, default=None, help="guidance (default: EditSettings, 4.0)")
    ap.add_argument("--tau", type=float, default=None, help="temperature (default: EditSettings, 0.5)")
    ap.add_argument("--prompt-iters", type=int, default=None, help="prompt-tuning updates (default 10)")
    ap.add_argument("--lora-iters", type=int, default=None, help="LoRA updates (default 50)")
    ap.add_argument("--threshold", type=float, default=None,
                    help=f"attention mask threshold (default: the toy preset's, {mask_threshold_for('toy')})")
    ap.add_argument("--core-threshold", type=float, default=None, dest="core",
                    help="automatic mask hysteresis level (default: EditSettings)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="also edit the automatic-mask cases with these edit settings (repeatable; each case is "
                         "learned once): e.g. holes:fill_holes=1; reported under edits.auto_variants")
    ap.add_argument("--shard", default="0/1", metavar="I/N", help="edit only the cases i with i %% N == I")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge shard reports (--keep-cases) into --out")
    ap.add_argument("--seeds", choices=sorted(SEED_SETS), default="heldout",
                    help="seed set of the scenes and edit cases: heldout (the evaluation) or calibration (where a "
                         "preset's inference defaults are chosen; train/scenes.py)")
    ap.add_argument("--batch", type=int, default=32, help="text-to-image batch")
    ap.add_argument("--keep-cases", action="store_true", help="store every case's verdict in the JSON")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop starting new edit cases after this long (the JSON says which sections were cut)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("editinfinity.edit", "editinfinity.models"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def cap(n: int) -> int:
        return min(n, args.limit) if args.limit is not None else n

    with claim_report(args.out, keys=REPORT_KEYS, overwrite=args.overwrite, inputs=args.merge or (),
                      indent=1) as write:  # checked before any work
        if args.merge:
            write(merge(args.merge))
            logging.info("merged %d reports into %s", len(args.merge), args.out)
            return 0
        return _evaluate(args, argv, write, cap)


def _evaluate(args, argv, write, cap) -> int:
    shard, shards = (int(v) for v in args.shard.split("/"))

    settings = EditSettings.from_profile("default", cfg=args.cfg, tau=args.tau, prompt_iters=args.prompt_iters,
                                         lora_iters=args.lora_iters, threshold=args.threshold, core=args.core)
    parsed = [parse_variant(v, settings) for v in args.variant]
    variants = {name: vs for name, vs, _ in parsed}
    changes = {name: ch for name, _, ch in parsed}
    t0 = time.perf_counter()
    deadline = t0 + 60 * args.max_minutes if args.max_minutes else None

    scene_base, edit_base = SEED_SETS[args.seeds]
    models = load_models("toy", weights=args.weights, device=args.device)
    load_s = time.perf_counter() - t0
    schedule = get_schedule(1.0, "0.06M")
    report: dict = {"command": " ".join(["python -m editinfinity.evaluation.toy_eval", *(argv if argv is not None else sys.argv[1:])]),
                    "weights": models.source, "device": str(models.device), "editinfinity": __version__,
                    "torch": torch.__version__, "python": platform.python_version(), "targets": TARGETS,
                    "seeds": {"set": args.seeds, "scenes_from": scene_base, "edit_cases_from": edit_base},
                    "settings": settings.effective_dict(models.preset), "seconds": {"load": round(load_s, 2)}}
    if torch.cuda.is_available() and models.device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(models.device)

    if cap(args.vae_images) > 0:
        t = time.perf_counter()
        report["vae"] = heldout_psnr(models.vae, heldout_scenes(cap(args.vae_images), base=scene_base), schedule,
                                     models.device)
        report["seconds"]["vae"] = round(time.perf_counter() - t, 2)
        write(report)
        logging.info("VAE PSNR %.2f dB on %d pictures", report["vae"]["mean_psnr"], report["vae"]["images"])

    if cap(args.generations) > 0:
        t = time.perf_counter()
        t2i = text_to_image_eval(models.transformer, models.vae, models.tokenizer, models.text_encoder,
                                 cap(args.generations), schedule=schedule, cfg=settings.cfg, tau=settings.tau,
                                 seed=settings.seed, batch=args.batch,
                                 scenes=heldout_scenes(cap(args.generations), base=scene_base))
        report["text_to_image"] = _strip(t2i, args.keep_cases)
        report["seconds"]["text_to_image"] = round(time.perf_counter() - t, 2)
        write(report)
        logging.info("text to image: objects as prompted %.1f%% of %d", 100 * t2i["objects_ok_rate"],
                     t2i["generations"])

    pipe = EditInfinityPipeline.from_bundle(models)
    cases = edit_cases(max(cap(args.edits), cap(args.mask_edits), cap(args.whole_edits)), base=edit_base)
    report["edits"] = {}
    for mode, n in (("auto", cap(args.edits)), ("mask", cap(args.mask_edits)), ("whole", cap(args.whole_edits))):
        if n <= 0:
            continue
        t = time.perf_counter()
        mine = [c for i, c in enumerate(cases[:n]) if i % shards == shard]
        if mode == "auto" and variants:
            res_all = edit_eval(pipe, len(mine), mode, settings, cases=mine, deadline=deadline,
                                variants={"default": settings, **variants})
            res = res_all.pop("default")
            report["edits"]["auto_variants"] = {k: {"settings": changes[k], **_strip(v, args.keep_cases)}
                                                for k, v in res_all.items()}
        else:
            res = edit_eval(pipe, len(mine), mode, settings, cases=mine, deadline=deadline)
        report["edits"][mode] = _strip(res, args.keep_cases)
        report["seconds"][f"edit_{mode}"] = round(time.perf_counter() - t, 2)
        write(report)
        if res["cases"]:
            logging.info("edit %s: present %.1f%%, PSNR outside %.2f dB, mask IoU %s (%d cases)", mode,
                         100 * res["present_rate"], res["psnr_outside_mean"], res.get("mask_iou_mean"), res["cases"])

    report["passed"] = passed(report)
    report["limited"] = args.limit is not None or shards > 1 or any(e.get("truncated")
                                                                     for e in report["edits"].values())
    report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    write(report)
    logging.info("wrote %s: %s", args.out, json.dumps(report["passed"]))
    return 0


if __name__ == "__main__":
    from editinfinity.interrupts import run_script

    sys.exit(run_script(main))
