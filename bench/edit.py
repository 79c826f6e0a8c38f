"""Benchmark: per-stage seconds and peak memory of one automatic-mask edit (10 prompt + 50 LoRA updates).

    python bench/edit.py --preset tiny --device cpu --out bench/results/edit_tiny_cpu.json
    python bench/edit.py --preset 2b-random --device cuda --with-load --out bench/results/edit_h200.json
    python bench/edit.py --preset 2b-random --device cuda --with-load --variants default,low-memory \\
        --out bench/results/edit_h200.json        # also writes edit_h200_low-memory.json

``--with-load`` first writes the preset's random weights as float32 safetensors (the layout of `editinfinity
convert`, the size of the official files) and then times loading every model from that directory, as a user with
converted official weights would. ``--variants`` runs several settings in one process on the same loaded models
(each ``--repeat`` times, or ``name:N`` times; the last run is reported): ``default`` (the flags below), ``low-memory``, ``compile``,
``no-checkpointing``, ``checkpoint-all``, ``cudnn-attention``, ``flash-attention``, ``eager`` (no torch.compile). The first
variant's numbers are the top-level fields of ``--out``; every variant is also under ``variants`` and, after the
first, in ``<out>_<variant>.json``. Existing result files are replaced only with ``--overwrite`` and only when they are
results of this benchmark.

Compilation (on by default on CUDA) keeps its caches in ``--compile-cache DIR`` (default: a new empty folder, so the
first edit of the process pays the cold compile: ``compile_cache: "cold"``). ``--fresh-process`` then starts a new
Python process on that (now warm) folder that imports, loads the weights and runs one edit of the first variant:
``first_edit_seconds_fresh_process`` is its time from being started to the edit written, with its
``import_seconds``, ``load_seconds`` and stage seconds under ``fresh_process``.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from editinfinity.demo import example_dir  # noqa: E402
from editinfinity.edit.run import run_edit  # noqa: E402
from editinfinity.edit.sequence import NOT_STAGES  # noqa: E402
from editinfinity.edit.settings import EditSettings, compile_enabled  # noqa: E402
from editinfinity.file_outputs import claim_report  # noqa: E402
from editinfinity.interrupts import run_script  # noqa: E402
from editinfinity.models.bundle import load_models  # noqa: E402
from editinfinity.models.checkpoints import write_model_index  # noqa: E402
from editinfinity.models.compile_cache import compile_cache_stats  # noqa: E402
from editinfinity.models.presets import get_preset  # noqa: E402
from editinfinity.scratch import scratch_dir  # noqa: E402
from editinfinity.toyworld import Scene, Shape, render  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _START
REFERENCE_TOTAL_SECONDS = 321  # ../shared/notes/reference-bench.md, one H200, random official-format weights


#: What every result of this benchmark holds (what --overwrite may replace).
REPORT_KEYS = ("benchmark", "stage_seconds", "preset")
GOALS = {"total_seconds_warm": 15.0, "total_seconds_with_load": 25.0, "peak_gpu_memory_gb": 40.0,
         "peak_gpu_memory_gb_low_memory": 24.0, "generation_seconds": 1.0, "first_edit_seconds_fresh_process": 30.0,
         "seconds_per_update": 0.2}
VARIANTS = {
    "default": {},
    "low-memory": {"low_memory": True},
    "compile": {"compile": True},
    "eager": {"compile": False},
    "no-checkpointing": {"checkpointing": "none"},
    "checkpoint-all": {"checkpointing": "all"},
    "cudnn-attention": {"attention_backend": "cudnn"},
    "flash-attention": {"attention_backend": "flash"},
}


def save_bundle(models, directory: Path, preset: str) -> None:
    models.transformer.save_pretrained(directory / "transformer")
    models.vae.save_pretrained(directory / "vae")
    models.text_encoder.save_pretrained(directory / "text_encoder")
    models.tokenizer.save_pretrained(directory / "tokenizer")
    write_model_index(directory, preset=preset)


def bench_image(directory: Path, resolution: str) -> tuple[Path, dict, tuple[int, int]]:
    """The bundled example scene rendered at the schedule's pixel size, and its case (prompts, target word)."""
    from editinfinity.models import schedules

    h, w = schedules.pixel_size(schedules.get_schedule(1.0, resolution))
    ex = example_dir()
    case = json.loads((ex / "case.json").read_text())
    scene = Scene.from_dict(json.loads((ex / "scene.json").read_text()))
    scale = w / scene.width
    big = Scene(scene.background, tuple(Shape(s.kind, s.colour, s.cx * scale, s.cy * scale, s.size * scale)
                                        for s in scene.shapes), w, h)
    image = directory / "image.png"
    render(big).save(image)
    return image, case, (h, w)


def stage_records(out: Path) -> dict:
    """Checkpointed blocks and update counts recorded by the training stages."""
    found = {}
    for stage in ("prompt", "lora"):
        path = out / "stages" / stage / "stage.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            found[stage] = {"checkpoint_blocks": rec.get("checkpoint_blocks"), "updates": len(rec.get("losses", []))}
    return found


def run_variant(name: str, overrides: dict, args, models, image: Path, case: dict, resolution: str,
                tmp: Path, repeat: int) -> dict:
    settings = EditSettings(prompt_iters=args.prompt_iters, lora_iters=args.lora_iters, **overrides)
    cuda = args.device.startswith("cuda")
    summary, totals, out, first_stages = None, [], None, None
    cache_before = compile_cache_stats()
    for i in range(repeat):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = run_edit(tmp / f"{name}{i}", image=str(image), prompt=case["prompt"], edit_prompt=case["edit_prompt"],
                       mode="auto", target_word=case["target_word"], resolution=resolution, models=models,
                       settings=settings, overwrite=True, progress=False)
        summary = json.loads((out / "summary.json").read_text())
        totals.append(summary["seconds"]["total"])
        if first_stages is None:
            first_stages = {k: v for k, v in summary["seconds"].items() if k not in NOT_STAGES}
    secs = summary["seconds"]
    cache_after = compile_cache_stats()
    return {
        "variant": name,
        "settings": {"checkpointing": settings.checkpointing, "low_memory": settings.low_memory,
                     "compile": settings.compile, "attention_backend": settings.attention_backend,
                     "frozen_dtype": summary["models"].get("frozen_dtype")},
        "compiled": compile_enabled(settings.compile, torch.device(args.device).type),
        # what the variant's runs did with the compile cache: compiled graphs (misses) or reused them (hits)
        "compile_cache_counts": {k: cache_after[k] - cache_before[k] for k in cache_after
                                 if k.endswith(("_hit", "_miss", "_bypass", "graphs", "graph_break"))},
        "first_run_stage_seconds": first_stages,
        "stage_seconds": {k: v for k, v in secs.items() if k not in NOT_STAGES},
        "total_seconds_warm": secs["total"],
        "total_seconds_all_runs": totals,
        "generation_seconds": secs["generate"],
        "peak_gpu_memory_gb": secs.get("peak_gpu_memory_gb"),
        "peak_gpu_memory_gb_after_stage": summary.get("peak_gpu_memory_gb_after_stage"),
        "training": stage_records(out),
        "seconds_per_update": {
            "tune_prompt": round(secs["tune_prompt"] / max(args.prompt_iters, 1), 4),
            "train_lora": round(secs["train_lora"] / max(args.lora_iters, 1), 4),
        },
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", default=None)
    ap.add_argument("--prompt-iters", type=int, default=10)
    ap.add_argument("--lora-iters", type=int, default=50)
    ap.add_argument("--with-load", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="edits per variant; the last is reported (the first warms up)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="storage of the frozen transformer blocks and T5 (auto: bf16 on CUDA)")
    ap.add_argument("--checkpointing", default=None, help="auto | none | all | N (the default variant)")
    ap.add_argument("--low-memory", action="store_true", help="the default variant in the low-memory setting")
    ap.add_argument("--compile", default=None, choices=("auto", "on", "off"),
                    help="torch.compile of the training blocks in the default variant (auto: on CUDA)")
    ap.add_argument("--attention-backend", default=None, choices=("auto", "flash", "cudnn", "efficient", "math"),
                    help="SDPA kernel preferred by the training stages (the default variant)")
    ap.add_argument("--variants", default="default", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--compile-cache", default=None,
                    help="torch.compile cache folder (TORCHINDUCTOR_CACHE_DIR); default: a new empty one (cold)")
    ap.add_argument("--fresh-process", action="store_true",
                    help="then time a new process's first edit (imports, loading, edit) on the warm compile cache")
    ap.add_argument("--weights", default=None, help="load the models from this converted-weights folder")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/edit.json")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out (and the files named after it) if they are earlier results of this benchmark")
    args = ap.parse_args(argv)
    # "name" or "name:repeat" (e.g. low-memory:1 after a warm default variant)
    args.repeats = {}
    for item in (v.strip() for v in args.variants.split(",") if v.strip()):
        name, _, count = item.partition(":")
        args.repeats[name] = int(count) if count else args.repeat
    unknown = [v for v in args.repeats if v not in VARIANTS]
    if unknown or not args.repeats:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def default_overrides(args) -> dict:
    default = {}
    if args.checkpointing is not None:
        default["checkpointing"] = args.checkpointing
    if args.low_memory:
        default["low_memory"] = True
    if args.compile is not None:
        default["compile"] = args.compile
    if args.attention_backend is not None:
        default["attention_backend"] = args.attention_backend
    return default


def child_command(args, weights: Path | None, out: Path) -> list[str]:
    """The command of the fresh process: the first variant once, same flags, models from ``weights``."""
    first = next(iter(args.repeats))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--preset", args.preset, "--device", args.device,
           "--prompt-iters", str(args.prompt_iters), "--lora-iters", str(args.lora_iters), "--dtype", args.dtype,
           "--variants", f"{first}:1", "--compile-cache", os.environ["TORCHINDUCTOR_CACHE_DIR"], "--out", str(out)]
    for flag, value in (("--resolution", args.resolution), ("--checkpointing", args.checkpointing),
                        ("--compile", args.compile), ("--attention-backend", args.attention_backend),
                        ("--weights", str(weights) if weights else None)):
        if value is not None:
            cmd += [flag, value]
    return cmd + (["--low-memory"] if args.low_memory else [])


def fresh_process(args, weights: Path | None, tmp: Path) -> dict:
    """Run :func:`child_command` and return its record, timed from the moment it was started."""
    out = tmp / "fresh_process.json"
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    started = time.time()
    subprocess.run(child_command(args, weights, out), check=True, env=os.environ.copy())
    record = json.loads(out.read_text())
    record["first_edit_seconds_fresh_process"] = round(record.pop("finished_at") - started, 3)
    return record


def child_main(args, work: Path) -> None:
    """The fresh process: import (timed by ``IMPORT_SECONDS``), load, one edit; record written to ``--out``."""
    name = next(iter(args.repeats))
    spec = get_preset(args.preset)
    resolution = args.resolution or spec.resolution
    tmp = work / "child"
    tmp.mkdir()
    image, case, _ = bench_image(tmp, resolution)
    t = time.perf_counter()
    models = load_models(args.preset, weights=args.weights, device=args.device, dtype=args.dtype)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - t
    overrides = default_overrides(args) if name == "default" else VARIANTS[name]
    r = run_variant(name, overrides, args, models, image, case, resolution, tmp, 1)
    record = {"import_seconds": round(IMPORT_SECONDS, 3), "load_seconds": round(load_seconds, 3),
              "variant": name, "stage_seconds": r["stage_seconds"], "total_seconds": r["total_seconds_warm"],
              "seconds_per_update": r["seconds_per_update"], "peak_gpu_memory_gb": r["peak_gpu_memory_gb"],
              "compile_cache_counts": r["compile_cache_counts"], "compile_cache": compile_cache_stats(),
              "seconds_from_start": round(time.perf_counter() - _START, 3), "finished_at": time.time()}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    with scratch_dir("editinfinity-bench-edit") as tmp:  # removed at the end (and after a SIGKILL, by the next run)
        _main(args, tmp)


def _main(args, tmp: Path) -> None:
    cache_dir = Path(args.compile_cache) if args.compile_cache else tmp / "compile-cache"
    cache_state = "warm" if cache_dir.is_dir() and any(cache_dir.iterdir()) else "cold"
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)  # read by Inductor at its first compile
    if args.child:
        child_main(args, tmp)
        return
    out_path = Path(args.out)
    names = list(args.repeats)
    with contextlib.ExitStack() as claims:
        # every result file is claimed before any work: an existing one needs --overwrite and must be ours
        writers = {name: claims.enter_context(claim_report(
            out_path if name == names[0] else out_path.with_name(f"{out_path.stem}_{name}{out_path.suffix}"),
            keys=REPORT_KEYS, overwrite=args.overwrite)) for name in names}
        measure(args, tmp, cache_state, writers)


def measure(args, tmp: Path, cache_state: str, writers: dict) -> None:
    """Every variant, then the fresh process; each result written with ``writers[variant]``."""
    names = list(args.repeats)
    default = default_overrides(args)

    spec = get_preset(args.preset)
    resolution = args.resolution or spec.resolution
    image, case, (h, w) = bench_image(tmp, resolution)
    cuda = args.device.startswith("cuda")

    t = time.perf_counter()
    # Saved weights must be float32 (the official files' size), so build in float32 when they are written.
    models = load_models(args.preset, weights=args.weights, device=args.device,
                         dtype="float32" if args.with_load else args.dtype)
    build_seconds = time.perf_counter() - t
    load_seconds = None
    weights = Path(args.weights) if args.weights else None
    if args.with_load:
        weights = tmp / "weights"
        save_bundle(models, weights, args.preset)
        del models
        if cuda:
            torch.cuda.empty_cache()
        t = time.perf_counter()
        models = load_models(args.preset, weights=str(weights), device=args.device, dtype=args.dtype)
        if cuda:
            torch.cuda.synchronize()
        load_seconds = time.perf_counter() - t

    common = {
        "benchmark": "edit (automatic mask)", "preset": args.preset, "resolution": resolution,
        "image_size": [h, w], "prompt_iters": args.prompt_iters, "lora_iters": args.lora_iters,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "load_seconds": load_seconds, "random_build_seconds": build_seconds, "import_seconds": IMPORT_SECONDS,
        "peak_cpu_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "reference_total_seconds": REFERENCE_TOTAL_SECONDS if args.preset.startswith("2b") else None,
        "compile_cache": cache_state,
        "goals": GOALS,
        "note": "generation_seconds is the generate stage: one CFG generation with LoRA and blending, VAE decodes "
                "of the edit and of the reconstruction, PNG writes; bench/generate.py times the generation alone. "
                "total_seconds_with_load = load_seconds + total_seconds_warm (Python imports excluded: "
                "import_seconds). compile_cache: the state of the torch.compile cache folder when this process "
                "started (cold: empty, the first edit compiles); first_run_stage_seconds: the stages of a "
                "variant's first edit. Memory in GiB (2**30 bytes).",
    }
    results: dict = {}

    def write() -> dict:
        full = {**common, **results[names[0]], "variants": results}
        writers[names[0]](full)
        return full

    for name in names:
        overrides = default if name == "default" else VARIANTS[name]
        r = run_variant(name, overrides, args, models, image, case, resolution, tmp, args.repeats[name])
        r["total_seconds_with_load"] = (r["total_seconds_warm"] + load_seconds) if load_seconds is not None else None
        results[name] = r
        print(f"{name}: warm {r['total_seconds_warm']:.2f} s, with load {r['total_seconds_with_load']}, "
              f"peak {r['peak_gpu_memory_gb']} GiB, stages {r['stage_seconds']}, first run "
              f"{r['first_run_stage_seconds']}, training {r['training']}, compile cache {r['compile_cache_counts']}",
              flush=True)
        # Written after every variant, so a run cut short keeps what it measured.
        write()
        if name != names[0]:
            writers[name]({**common, **r})
    if args.fresh_process:
        child = fresh_process(args, weights, tmp)
        common["first_edit_seconds_fresh_process"] = child["first_edit_seconds_fresh_process"]
        common["fresh_process"] = child
        print(f"fresh process: first edit {child['first_edit_seconds_fresh_process']} s after start (imports "
              f"{child['import_seconds']} s, load {child['load_seconds']} s, edit {child['total_seconds']} s, "
              f"compile cache {child['compile_cache_counts']})", flush=True)
    print(json.dumps(write(), indent=2))


if __name__ == "__main__":
    sys.exit(run_script(main))
