"""What the pipeline adds around an edit: the fused KFP run (every GPU stage in one component) against the same
edit from the command line, both end to end as new processes.

    python bench/pod_overhead.py --preset toy --out bench/results/pod_overhead_cpu.json

Runs ``editinfinity edit`` and ``editinfinity pipeline run-local edit --fused`` (kfp.local, each component in its
own Python process, artifacts through the local pipeline root) on the bundled example and reports, for each, the
wall time of the command, the edit's own stage seconds and model-loading seconds from its ``summary.json``, and the
difference (process starts, imports, kfp.local bookkeeping, artifact copies, the summary/publish steps). A real
cluster adds what no local run can show: pod scheduling, image pull, container start and object-store transfers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from editinfinity.file_outputs import claim_report
from editinfinity.interrupts import run_script
from editinfinity.scratch import scratch_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "core" / "editinfinity" / "assets" / "examples" / "shapes"


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    sec = s.get("seconds", {})
    stages = {k: v for k, v in sec.items() if k not in ("total", "load_models")}
    return {"stage_seconds": stages, "edit_seconds": round(sum(stages.values()), 3),
            "load_seconds": sec.get("load_models")}


#: What every result of this benchmark holds (what --overwrite may replace).
REPORT_KEYS = ("cli", "kfp_local_fused", "pipeline_overhead_over_cli_seconds")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--device", default=None, help="passed to the CLI edit (the pipeline picks its own)")
    ap.add_argument("--out", default="bench/results/pod_overhead.json")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an earlier result of this benchmark (never another file)")
    args = ap.parse_args(argv)
    with claim_report(args.out, keys=REPORT_KEYS, overwrite=args.overwrite) as write:  # before any work
        report = measure(args)
        write(report)
    print(json.dumps(report, indent=1))
    return 0


def measure(args) -> dict:
    case = json.loads((EXAMPLE / "case.json").read_text())
    exe = str(Path(sys.executable).with_name("editinfinity"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    report: dict = {"preset": args.preset, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    with scratch_dir("pod-overhead") as tmp:
        tmp = Path(tmp)
        cli_out = tmp / "cli"
        cmd = [exe, "edit", "--image", str(EXAMPLE / case["image"]), "--prompt", case["prompt"], "--edit-prompt",
               case["edit_prompt"], "--target-word", case["target_word"], "--preset", args.preset,
               "--out", str(cli_out), "-q"] + (["--device", args.device] if args.device else [])
        wall = _timed(cmd, env)
        report["cli"] = {"wall_seconds": round(wall, 3), **_summary(cli_out)}
        report["cli"]["overhead_seconds"] = round(wall - report["cli"]["edit_seconds"], 3)

        kfp_out = tmp / "kfp-out"
        cmd = [exe, "pipeline", "run-local", "edit", "--fused", "--pipeline-root", str(tmp / "root"),
               "-p", f"image_uri={EXAMPLE / case['image']}", "-p", f"prompt={case['prompt']}",
               "-p", f"edit_prompt={case['edit_prompt']}", "-p", "mode=auto", "-p", f"target_word={case['target_word']}",
               "-p", f"preset={args.preset}", "-p", f"output_uri={kfp_out}"]
        wall = _timed(cmd, env)
        report["kfp_local_fused"] = {"wall_seconds": round(wall, 3), **_summary(kfp_out)}
        report["kfp_local_fused"]["overhead_seconds"] = round(wall - report["kfp_local_fused"]["edit_seconds"], 3)
        shutil.rmtree(tmp / "root", ignore_errors=True)
    report["pipeline_overhead_over_cli_seconds"] = round(report["kfp_local_fused"]["wall_seconds"]
                                                         - report["cli"]["wall_seconds"], 3)
    return report


if __name__ == "__main__":
    sys.exit(run_script(main))
