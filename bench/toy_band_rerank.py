"""Choosing the smoothing band per edit by the model's own likelihood (an experiment on the toy model).

On the toy model's 16-cell grid the ``scaled`` band leaves an object that changes shape no room outside its old
cells, while the ``reference`` band (1- and 4-cell distances) gives room but lets the model redraw a neighbouring
object in the freed region (docs/method.md, the smoothing band). This benchmark edits every automatic-mask case
once per band (each case learned once) and scores every edited picture with the base transformer (no LoRA, no
learned rows): the teacher-forced bit cross-entropy of the picture's exact codes under the plain edit prompt and
under the plain source prompt (``editinfinity.edit.likelihood``, the score of ``band="auto"``; the committed results
were made with this script's first version, which computed the same score itself, through ``encode_image``). A rule
then keeps, per case, the band whose picture scores best (``contrast`` is what ``band="auto"`` does):

* ``edit``: the lowest cross-entropy under the edit prompt;
* ``contrast``: the lowest (edit prompt - source prompt) cross-entropy: the picture that moved furthest from the
  source caption towards the edit caption.

It prints and writes, per band and per rule, the automatic-edit rates of ``toy_eval`` (attribute present, mask IoU,
PSNR outside the edit). Choose on the calibration seeds, confirm on the held-out ones:

    python bench/toy_band_rerank.py --seeds calibration --cases 0:64 --out /tmp/rerank_a.json
    python bench/toy_band_rerank.py --merge /tmp/rerank_a.json /tmp/rerank_b.json \\
        --out bench/results/toy_band_rerank_calibration_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys

import numpy as np
import torch

from editinfinity import __version__
from editinfinity.edit.likelihood import prompt_cross_entropy
from editinfinity.edit.mask import BANDS
from editinfinity.edit.settings import EditSettings
from editinfinity.evaluation.toy_judge import edit_cases, edit_eval
from editinfinity.file_outputs import claim_report
from editinfinity.interrupts import run_script
from editinfinity.models.bundle import load_models
from editinfinity.pipeline import EditInfinityPipeline
from editinfinity.train.data import SEED_SETS

#: What every result of this benchmark holds (what --overwrite may replace).
REPORT_KEYS = ("command", "bands", "cases", "summary")
RULES = {
    "edit": lambda r: r["ce_edit"],
    "contrast": lambda r: r["ce_edit"] - r["ce_source"],
}
RULE_TEXT = {"edit": "lowest bit CE under the edit prompt",
             "contrast": "lowest (edit prompt - source prompt) bit CE"}


def summarise(cases: dict[str, dict[str, dict]], bands: list[str]) -> dict:
    """Rates per band and per rule over the cases every band was run on."""
    def rates(rows: list[dict]) -> dict:
        return {"n": len(rows),
                "present_rate": float(np.mean([r["present"] for r in rows])),
                "matches_rate": float(np.mean([r["matches"] for r in rows])),
                "mask_iou_mean": float(np.mean([r["mask_iou"] for r in rows])),
                "psnr_outside_mean": float(np.mean([r["psnr_outside"] for r in rows])),
                "psnr_outside_ge_30_rate": float(np.mean([r["psnr_outside"] >= 30 for r in rows]))}

    keys = sorted(cases, key=int)
    out = {"bands": {b: rates([cases[k][b] for k in keys]) for b in bands}, "rules": {}}
    for name, score in RULES.items():
        picks = [min(bands, key=lambda b, k=k: score(cases[k][b])) for k in keys]
        out["rules"][name] = {**rates([cases[k][b] for k, b in zip(keys, picks, strict=True)]),
                              "picked": {b: picks.count(b) for b in bands}}
    out["any_band_present_rate"] = float(np.mean([any(cases[k][b]["present"] for b in bands) for k in keys]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="weights directory (default: the toy preset's bundled weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", choices=sorted(SEED_SETS), default="calibration")
    ap.add_argument("--cases", default="0:64", help="edit cases START:END (numbered from the seed set's base)")
    ap.add_argument("--bands", default=",".join(BANDS), help=f"comma-separated, from {', '.join(BANDS)}")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge earlier reports (disjoint cases) into --out")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an earlier result of this benchmark (never another file)")
    args = ap.parse_args(argv)
    bands = [b for b in args.bands.split(",") if b]
    if not bands or any(b not in BANDS for b in bands):
        ap.error(f"--bands: choose from {', '.join(BANDS)}, got {args.bands!r}")
    command = " ".join(["python bench/toy_band_rerank.py", *(argv if argv is not None else sys.argv[1:])])
    with claim_report(args.out, keys=REPORT_KEYS, overwrite=args.overwrite, indent=1,
                      inputs=args.merge or ()) as write:  # before any work
        if args.merge:
            return merge(args.merge, command, write)
        return measure(args, bands, command, write)


def merge(paths: list[str], command: str, write) -> int:
    parts = [json.loads(open(p).read()) for p in paths]
    bands = parts[0]["bands"]
    if any(p["bands"] != bands or p["seeds"] != parts[0]["seeds"] for p in parts):
        raise SystemExit("--merge: the reports differ in --bands or --seeds")
    cases: dict = {}
    for p in parts:
        overlap = set(cases) & set(p["cases"])
        if overlap:
            raise SystemExit(f"--merge: case(s) {sorted(overlap, key=int)} appear in more than one report")
        cases.update(p["cases"])
    report = {**parts[0], "command": command, "merged_from": [p["command"] for p in parts], "cases": cases,
              "summary": summarise(cases, bands)}
    write(report)
    print(json.dumps(report["summary"], indent=1))
    return 0


def measure(args, bands: list[str], command: str, write) -> int:
    start, _, end = args.cases.partition(":")
    start, end = int(start), int(end)
    scene_base, edit_base = SEED_SETS[args.seeds]
    models = load_models("toy", weights=args.weights, device=args.device)
    pipe = EditInfinityPipeline.from_bundle(models)
    settings = EditSettings.from_profile("default")
    variants = {b: dataclasses.replace(settings, band=b) for b in bands}
    report = {"command": command, "weights": models.source, "device": str(models.device), "editinfinity": __version__,
              "torch": torch.__version__, "python": platform.python_version(),
              "seeds": {"set": args.seeds, "edit_cases_from": edit_base}, "bands": bands,
              "settings": settings.effective_dict(models.preset), "rules": RULE_TEXT,
              "cases": {}}

    def score(case, out) -> dict:
        ce = prompt_cross_entropy(models, out.case, out.image)  # the score band="auto" uses
        return {"ce_edit": ce["edit_plain"], "ce_source": ce["source_plain"]}

    for case in edit_cases(end - start, base=edit_base + start):
        number = str(start + case["case"])
        res = edit_eval(pipe, 1, "auto", settings, cases=[case], variants=variants, observe=score)
        report["cases"][number] = {b: {k: v for k, v in res[b]["results"][0].items() if k != "case"} for b in bands}
        report["summary"] = summarise(report["cases"], bands)
        write(report)  # after every case, so a run cut short keeps what it measured
        row = report["cases"][number]
        print(number, row[bands[0]]["edit_prompt"], {b: (int(row[b]["present"]), round(row[b]["ce_edit"] -
              row[b]["ce_source"], 3)) for b in bands}, flush=True)
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
