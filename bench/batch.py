"""Benchmark: the batch worker over N synthetic cases (two edit prompts per image), against single edits.

    python bench/batch.py --preset tiny --device cpu --cases 4 --out /tmp/batch_cpu.json          # smoke run
    python bench/batch.py --preset 2b-random --device cuda --cases 8 --gpus 1,2 \\
        --out bench/results/batch_h200.json

One process (``--gpus 1``): imports, one ``Worker`` (models loaded once) over every case, then one single edit
through ``bench/edit.py``'s path (``run_edit`` with the loaded models) on a new image with the same settings. Fields:
``warm_case_seconds`` (median wall time of an image's first case in the warm worker: learn + edit + publish; the
first group, which pays one-off warm-up, is left out), ``warm_single_edit_seconds`` (wall time of the single edit),
``warm_case_ratio`` (their ratio), ``additional_edit_seconds`` (median wall time of an already-learned image's next
edit), ``worker_start_seconds`` (imports + model loading; + the first group's extra time over a warm one as
``first_case_extra_seconds``), ``gpu_busy_fraction`` (mean of ``nvidia-smi`` utilization samples during the worker
run), ``cases_per_hour``.

``--gpus 1,2`` adds runs with N worker processes over the same cases (``editinfinity batch work --devices``), one
per visible GPU, or all on GPU 0 when fewer are visible (then the JSON says ``processes_share_one_device``): wall time,
``cases_per_hour`` and ``scaling`` (throughput over the one-process run's, both including the start), written to
``<out>_<n>proc.json``. Existing result files are replaced only with ``--overwrite`` and only when they are results
of this benchmark.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from editinfinity.batch.plan import make_plan, write_plan  # noqa: E402
from editinfinity.batch.worker import Worker, run_processes  # noqa: E402
from editinfinity.edit.run import run_edit  # noqa: E402
from editinfinity.edit.settings import EditSettings  # noqa: E402
from editinfinity.file_outputs import claim_report  # noqa: E402
from editinfinity.interrupts import run_script  # noqa: E402
from editinfinity.models import schedules  # noqa: E402
from editinfinity.models.presets import get_preset  # noqa: E402
from editinfinity.scratch import scratch_dir  # noqa: E402
from editinfinity.toyworld import Scene, Shape, caption, render  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _START
GOALS = {"warm_case_ratio": 1.05, "additional_edit_seconds": 2.5}


#: What every result of this benchmark holds (what --overwrite may replace).
REPORT_KEYS = ("benchmark", "cases_per_hour", "settings")
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")


class GpuSampler:
    """``nvidia-smi`` utilization samples (every 100 ms) of every visible GPU while the block runs."""

    def __init__(self, enabled: bool):
        self.enabled, self.samples, self.proc = enabled, [], None

    def __enter__(self):
        if self.enabled:
            try:
                self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu",
                                              "--format=csv,noheader,nounits", "-lms", "100"],
                                             stdout=subprocess.PIPE, text=True)
            except OSError:
                self.proc = None
            if self.proc:
                self.thread = threading.Thread(target=self._read, daemon=True)
                self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[1].isdigit():
                self.samples.append((int(parts[0]), int(parts[1])))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=2)

    def busy(self) -> dict:
        per: dict[int, list[int]] = {}
        for gpu, util in self.samples:
            per.setdefault(gpu, []).append(util)
        return {str(g): round(statistics.mean(v) / 100, 3) for g, v in sorted(per.items())}


def make_cases(directory: Path, n: int, resolution: str, prompts_per_image: int = 2, first: int = 0) -> list[dict]:
    """``n`` cases over ceil(n / prompts_per_image) rendered scenes (scene ``first`` on) at the budget's square size;
    mode auto."""
    h, w = schedules.pixel_size(schedules.get_schedule(1.0, resolution))
    cases = []
    for i in range(first, first + (n + prompts_per_image - 1) // prompts_per_image):
        kind, colour = SHAPES[i % len(SHAPES)], COLOURS[i % len(COLOURS)]
        scene = Scene("gray", (Shape(kind, colour, w * 0.45, h * 0.5, w * 0.35),), w, h)
        image = directory / f"image{i}.png"
        render(scene).save(image)
        prompt = caption(scene)
        for j in range(prompts_per_image):
            if len(cases) == n:
                break
            other = COLOURS[(i + j + 1) % len(COLOURS)]
            cases.append({"id": f"c{i:03d}-{j}", "image": str(image), "prompt": prompt,
                          "edit_prompt": prompt.replace(colour, other, 1), "mode": "auto", "target_word": kind,
                          "mask": "", "output_uri": ""})
    return cases


def one_process(args, settings: EditSettings, cases: list[dict], tmp: Path, resolution: str) -> dict:
    plan = make_plan(cases, output_uri=str(tmp / "out1"), shards=1, preset=args.preset, resolution=resolution,
                     settings=settings)
    cuda = args.device.startswith("cuda")
    t = time.perf_counter()
    worker = Worker(plan, device=args.device)
    load = time.perf_counter() - t
    with GpuSampler(cuda) as sampler:
        t = time.perf_counter()
        statuses = worker.run(plan.shard_groups(0))
        run_seconds = time.perf_counter() - t
    failed = [s for s in statuses if s["status"] != "done"]
    if failed:
        raise SystemExit(f"benchmark cases failed: {failed[:2]}")
    by_id = {s["id"]: s for s in statuses}
    firsts, extras = [], []
    for g in plan.groups:
        ids = [c["id"] for c in g["cases"]]
        firsts.append(by_id[ids[0]]["learn_seconds"] + by_id[ids[0]]["seconds"]["case"])
        extras += [by_id[i]["seconds"]["case"] for i in ids[1:]]
    warm = statistics.median(firsts[1:]) if len(firsts) > 1 else firsts[0]
    # the single edit of bench/edit.py's path, same settings, a new image (nothing learned for it)
    (tmp / "single").mkdir()
    single_case = make_cases(tmp / "single", 1, resolution, first=len(plan.groups))[0]
    t = time.perf_counter()
    out = run_edit(tmp / "single-out", image=single_case["image"], prompt=single_case["prompt"],
                   edit_prompt=single_case["edit_prompt"], mode="auto", target_word=single_case["target_word"],
                   resolution=resolution, models=worker.models, settings=EditSettings(**vars(settings)),
                   progress=False)
    single = time.perf_counter() - t
    single_stages = json.loads((out / "summary.json").read_text())["seconds"]
    start = IMPORT_SECONDS + load
    return {
        "processes": 1, "cases": len(cases), "images": len(plan.groups),
        "warm_case_seconds": round(warm, 3),
        "warm_single_edit_seconds": round(single, 3),
        "warm_single_edit_stage_seconds": single_stages,
        "warm_case_ratio": round(warm / single, 4),
        "additional_edit_seconds": round(statistics.median(extras), 3) if extras else None,
        "worker_start_seconds": round(start, 3), "import_seconds": round(IMPORT_SECONDS, 3),
        "load_seconds": round(load, 3),
        "first_case_extra_seconds": round(firsts[0] - warm, 3),
        "first_case_seconds": round(firsts[0], 3),
        "case_seconds_first_of_image": [round(x, 3) for x in firsts],
        "case_seconds_additional": [round(x, 3) for x in extras],
        "worker_run_seconds": round(run_seconds, 3),
        "wall_seconds": round(start + run_seconds, 3),
        "cases_per_hour": round(len(cases) / (start + run_seconds) * 3600, 1),
        "gpu_busy_fraction": sampler.busy().get("0") if cuda else None,
        "gpu_busy_fraction_per_gpu": sampler.busy(),
    }


def several_processes(args, settings: EditSettings, cases: list[dict], tmp: Path, resolution: str, n: int) -> dict:
    plan = make_plan(cases, output_uri=str(tmp / f"out{n}"), shards=1, preset=args.preset, resolution=resolution,
                     settings=settings)
    path = write_plan(plan, tmp / f"plan{n}.json")
    visible = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    devices = [f"cuda:{i}" for i in range(n)] if visible >= n else [args.device if visible == 0 else "cuda:0"] * n
    with GpuSampler(visible > 0) as sampler:
        t = time.perf_counter()
        statuses = run_processes(path, 0, devices, log_dir=args.log_dir or tmp)
        wall = time.perf_counter() - t
    done = sum(s["status"] == "done" for s in statuses)
    return {"processes": n, "devices": devices, "processes_share_one_device": len(set(devices)) < n,
            "cases": len(cases), "cases_done": done, "wall_seconds": round(wall, 3),
            "cases_per_hour": round(done / wall * 3600, 1),
            "seconds_per_case": round(wall / max(done, 1), 3),
            "gpu_busy_fraction_per_gpu": sampler.busy(),
            "note": "wall time from starting the processes (imports and model loading included) to the last case"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", default=None)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--gpus", default="1", help="process counts to run, e.g. 1,2")
    ap.add_argument("--prompt-iters", type=int, default=10)
    ap.add_argument("--lora-iters", type=int, default=50)
    ap.add_argument("--compile", default=None, help="EditSettings.compile for the run (default: the settings')")
    ap.add_argument("--log-dir", default=None, help="where the worker processes' logs go (default: a temp folder)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out (and the files named after it) if they are earlier results of this benchmark")
    args = ap.parse_args()
    resolution = args.resolution or get_preset(args.preset).resolution
    overrides = {"prompt_iters": args.prompt_iters, "lora_iters": args.lora_iters}
    if args.compile is not None:
        overrides["compile"] = {"true": True, "false": False}.get(args.compile.lower(), args.compile)
    settings = EditSettings(**overrides)
    counts = [int(x) for x in args.gpus.split(",")]
    env = {"preset": args.preset, "resolution": resolution, "device": args.device, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
           "settings": {k: getattr(settings, k) for k in ("prompt_iters", "lora_iters", "compile", "checkpointing")}}
    out = Path(args.out)
    with contextlib.ExitStack() as claims, scratch_dir("bench-batch") as tmp:
        # every result file is claimed before any work: an existing one needs --overwrite and must be ours
        writers = {n: claims.enter_context(claim_report(out if n == 1 else out.with_name(f"{out.stem}_{n}proc.json"),
                                                        keys=REPORT_KEYS, overwrite=args.overwrite))
                   for n in dict.fromkeys([1, *counts])}
        tmp = Path(tmp)
        (tmp / "cases").mkdir()
        cases = make_cases(tmp / "cases", args.cases, resolution)
        base = {"benchmark": "batch worker", **env, **one_process(args, settings, cases, tmp, resolution),
                "goals": GOALS}
        base["goals_met"] = {"warm_case_ratio": base["warm_case_ratio"] <= GOALS["warm_case_ratio"],
                             "additional_edit_seconds": (base["additional_edit_seconds"] or 0)
                             <= GOALS["additional_edit_seconds"]}
        writers[1](base)
        print(json.dumps(base, indent=2))
        for n in counts:
            if n == 1:
                continue
            result = {"benchmark": "batch worker processes", **env,
                      **several_processes(args, settings, cases, tmp, resolution, n)}
            result["scaling"] = round(result["cases_per_hour"] / base["cases_per_hour"], 3)
            result["one_process_cases_per_hour"] = base["cases_per_hour"]
            writers[n](result)
            print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(run_script(main))
