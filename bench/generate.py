"""Benchmark: one 1M-pixel generation with CFG (13 scales, KV cache) of the 2B configuration with random weights.

Prints and writes JSON: seconds per image (median of timed runs after warm-up), peak GPU memory, device, versions.
    python bench/generate.py --preset 2b-random --device cuda --out bench/results/generate_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from editinfinity.file_outputs import claim_report
from editinfinity.interrupts import run_script
from editinfinity.models import schedules
from editinfinity.models.infinity import Infinity
from editinfinity.models.presets import get_preset
from editinfinity.models.text import TextFeatures

#: What every result of this benchmark holds (what --overwrite may replace).
REPORT_KEYS = ("benchmark", "seconds_per_image_median", "preset")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="2b-random")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", default="1M")
    ap.add_argument("--h-div-w", type=float, default=1.0)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--storage", default="auto", choices=("auto", "float32"),
                    help="block weight storage: auto = the autocast dtype on CUDA (as load_models), float32")
    ap.add_argument("--out", default="bench/results/generate.json")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an earlier result of this benchmark (never another file)")
    args = ap.parse_args()
    with claim_report(args.out, keys=REPORT_KEYS, overwrite=args.overwrite) as write:  # before any work
        write(measure(args))


def measure(args) -> dict:

    device = torch.device(args.device)
    spec = get_preset(args.preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = Infinity(**spec.transformer)
    dtype = getattr(torch, args.dtype)
    model.eval().requires_grad_(False)
    if args.storage == "auto" and device.type == "cuda":
        model.cast_frozen(dtype)  # identical results under autocast of that dtype, no per-call weight casts
    schedule = schedules.get_schedule(args.h_div_w, args.resolution)
    text = TextFeatures(torch.randn(args.text_tokens, model.config.text_channels, device=device) * 0.3,
                        [args.text_tokens])

    def once(seed: int) -> float:
        gen = torch.Generator(device=device).manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            model.generate(text, schedule, cfg=args.cfg, tau=0.5, top_k=900, top_p=0.97, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for i in range(args.warmup):
        once(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [once(100 + i) for i in range(args.runs)]
    result = {
        "benchmark": "generate", "preset": args.preset, "resolution": args.resolution,
        "schedule_last_grid": list(schedules.last_grid(schedule)), "tokens": schedules.num_tokens(schedule),
        "scales": len(schedule), "cfg": args.cfg, "dtype": args.dtype, "device": str(device),
        "block_weight_storage": str(model.frozen_dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters()),
        "seconds_per_image_median": statistics.median(times), "seconds_per_image_min": min(times),
        "seconds_all": times,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "targets": {"seconds_per_image": 1.0, "peak_gpu_memory_gb": 16.0},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))
