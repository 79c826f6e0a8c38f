"""Text-to-image accuracy of the toy model under several sampling settings, on one seed set.

Chooses a preset's sampling defaults on the *calibration* seeds (``train/scenes.py``), so the evaluation's
held-out seeds (``python -m editinfinity.evaluation.toy_eval``) stay untouched by the choice. Every setting draws
the same captions with the same generator seed; a setting gives guidance and temperature as one number or one
value per scale (``/``-separated, as many as the schedule has scales):

    python bench/toy_sampling.py --device cuda --n 400 --objects 2 \\
        --setting base:cfg=4,tau=0.5 --setting coarse8:cfg=8/8/8/4/4/4/4,tau=0.5 \\
        --out bench/results/toy_sampling_h200.json

Prints one line per setting (objects as prompted, by object count) and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from editinfinity import __version__, toyworld
from editinfinity.evaluation.toy_judge import text_to_image_eval
from editinfinity.file_outputs import claim_report
from editinfinity.interrupts import run_script
from editinfinity.models.bundle import load_models
from editinfinity.models.schedules import get_schedule
from editinfinity.train.data import SEED_SETS, heldout_scenes


def parse_setting(text: str, scales: int) -> tuple[str, dict]:
    """``NAME:cfg=V,tau=V[,top_p=V]`` where V is a number or ``scales`` numbers joined by ``/``."""
    name, _, body = text.partition(":")
    out: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in ("cfg", "tau", "top_p", "top_k"):
            raise SystemExit(f"--setting {text}: unknown key {key!r} (cfg, tau, top_p, top_k)")
        parts = [float(v) for v in value.split("/")]
        if len(parts) not in (1, scales) or (len(parts) > 1 and key in ("top_p", "top_k")):
            raise SystemExit(f"--setting {text}: {key} takes one value or {scales} (one per scale)")
        out[key] = parts[0] if len(parts) == 1 else parts
        if key == "top_k":
            out[key] = int(out[key])
    if not name or not out:
        raise SystemExit(f"--setting {text}: expected NAME:key=value[,key=value...]")
    return name, out


#: What every result of this benchmark holds (what --overwrite may replace).
REPORT_KEYS = ("command", "weights", "captions", "results")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="weights directory (default: the toy preset's bundled weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", choices=sorted(SEED_SETS), default="calibration")
    ap.add_argument("--n", type=int, default=400, help="captions judged per setting")
    ap.add_argument("--objects", type=int, choices=(0, 1, 2), default=0,
                    help="only scenes with this many objects (0: the world's own mix)")
    ap.add_argument("--setting", action="append", required=True, metavar="NAME:cfg=V,tau=V")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (the same for every setting)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an earlier result of this benchmark (never another file)")
    args = ap.parse_args(argv)
    with claim_report(args.out, keys=REPORT_KEYS, overwrite=args.overwrite, indent=1) as write:  # before any work
        return measure(args, argv, write)


def measure(args, argv, write) -> int:
    schedule = get_schedule(1.0, "0.06M")
    settings = [parse_setting(s, len(schedule)) for s in args.setting]
    scene_base, _ = SEED_SETS[args.seeds]
    scenes: list[toyworld.Scene] = []
    offset = 0
    while len(scenes) < args.n:  # draw seeds in order, keeping those with the requested object count
        more = heldout_scenes(4 * args.n, base=scene_base + offset)
        offset += 4 * args.n
        scenes += [s for s in more if not args.objects or len(s.shapes) == args.objects]
    scenes = scenes[:args.n]
    models = load_models("toy", weights=args.weights, device=args.device)
    report = {"command": " ".join(["python bench/toy_sampling.py", *(argv if argv is not None else sys.argv[1:])]),
              "weights": models.source, "device": str(models.device), "editinfinity": __version__,
              "torch": torch.__version__, "python": platform.python_version(),
              "seeds": {"set": args.seeds, "scenes_from": scene_base}, "captions": len(scenes),
              "objects": args.objects or "mixed", "results": {}}
    if models.device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(models.device)
    for name, kw in settings:
        t2i = text_to_image_eval(models.transformer, models.vae, models.tokenizer, models.text_encoder, len(scenes),
                                 schedule=schedule, seed=args.seed, batch=args.batch, scenes=scenes, **kw)
        by = {k: v for k, v in t2i["by_objects"].items() if v["n"]}
        row = {"settings": kw, **{k: t2i[k] for k in ("n", "objects_ok_rate", "matches_rate", "seconds")},
               "by_objects": by}
        report["results"][name] = row
        parts = ", ".join(f"{k} object(s) {100 * v['objects_ok_rate']:.1f}%" for k, v in by.items())
        print(f"{name:>24}: objects as prompted {100 * row['objects_ok_rate']:5.1f}% of {row['n']} ({parts}), "
              f"{row['seconds']:.0f} s", flush=True)
        write(report)  # after every setting, so a run cut short keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
