"""Benchmark: per-stage seconds and peak memory of one automatic-mask edit (10 prompt + 50 LoRA updates).

    python bench/edit.py --preset tiny --device cpu --out bench/results/edit_tiny_cpu.json
    python bench/edit.py --preset 2b-random --device cuda --with-load --out bench/results/edit_h200.json

``--with-load`` first writes the preset's random weights as safetensors (the layout of `editinfinity convert`) and
then times loading every model from that directory, as a user with converted official weights would.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from editinfinity.demo import example_dir
from editinfinity.edit.run import run_edit
from editinfinity.edit.settings import EditSettings
from editinfinity.models.bundle import load_models
from editinfinity.models.checkpoints import write_model_index
from editinfinity.models.presets import get_preset
from editinfinity.toyworld import Scene, Shape, render

REFERENCE_TOTAL_SECONDS = 321  # ../shared/notes/reference-bench.md, one H200, random official-format weights


def save_bundle(models, directory: Path, preset: str) -> None:
    models.transformer.save_pretrained(directory / "transformer")
    models.vae.save_pretrained(directory / "vae")
    models.text_encoder.save_pretrained(directory / "text_encoder")
    models.tokenizer.save_pretrained(directory / "tokenizer")
    write_model_index(directory, preset=preset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", default=None)
    ap.add_argument("--prompt-iters", type=int, default=10)
    ap.add_argument("--lora-iters", type=int, default=50)
    ap.add_argument("--with-load", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="edits to run; the last is reported (the first warms up)")
    ap.add_argument("--out", default="bench/results/edit.json")
    args = ap.parse_args()

    spec = get_preset(args.preset)
    resolution = args.resolution or spec.resolution
    from editinfinity.models import schedules

    h, w = schedules.pixel_size(schedules.get_schedule(1.0, resolution))
    ex = example_dir()
    case = json.loads((ex / "case.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="bench-edit-"))
    scene = Scene.from_dict(json.loads((ex / "scene.json").read_text()))
    scale = w / scene.width
    big = Scene(scene.background, tuple(Shape(s.kind, s.colour, s.cx * scale, s.cy * scale, s.size * scale)
                                        for s in scene.shapes), w, h)
    image = tmp / "image.png"
    render(big).save(image)

    t = time.perf_counter()
    models = load_models(args.preset, device=args.device)
    build_seconds = time.perf_counter() - t
    load_seconds = None
    if args.with_load:
        save_bundle(models, tmp / "weights", args.preset)
        del models
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        t = time.perf_counter()
        models = load_models(args.preset, weights=str(tmp / "weights"), device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        load_seconds = time.perf_counter() - t
    settings = EditSettings(prompt_iters=args.prompt_iters, lora_iters=args.lora_iters)
    summary = None
    for i in range(args.repeat):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        out = run_edit(tmp / f"out{i}", image=str(image), prompt=case["prompt"], edit_prompt=case["edit_prompt"],
                       mode="auto", target_word=case["target_word"], resolution=resolution, models=models,
                       settings=settings, overwrite=True, progress=False)
        summary = json.loads((out / "summary.json").read_text())
    secs = summary["seconds"]
    gen_t = secs["generate"]
    result = {
        "benchmark": "edit (automatic mask)", "preset": args.preset, "resolution": resolution,
        "image_size": [h, w], "prompt_iters": args.prompt_iters, "lora_iters": args.lora_iters,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__, "stage_seconds": {k: v for k, v in secs.items() if k not in ("total",)},
        "total_seconds_warm": secs["total"],
        "total_seconds_with_load": (secs["total"] + load_seconds) if load_seconds is not None else None,
        "load_seconds": load_seconds, "random_build_seconds": build_seconds,
        "generation_seconds": gen_t,
        "peak_gpu_memory_gb": secs.get("peak_gpu_memory_gb"),
        "peak_cpu_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "reference_total_seconds": REFERENCE_TOTAL_SECONDS if args.preset.startswith("2b") else None,
        "note": "generation_seconds is the generate stage: one CFG generation with blending, VAE decodes of the "
                "edit and of the reconstruction",
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
