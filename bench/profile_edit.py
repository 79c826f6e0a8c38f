"""Where the time of an edit goes: torch.profiler over one prompt-tuning update, one LoRA update and one generation.

    python bench/profile_edit.py --preset 2b-random --device cuda --out-dir bench/results
    python bench/profile_edit.py --preset tiny --device cpu --out-dir /tmp/profile     # plumbing check

For each region: wall seconds (median of ``--timed`` runs after ``--warmup``, device-synchronised, no profiler),
peak GPU memory, then one profiled run: the top kernels by device time (on the CPU: top operators by self CPU
time), device time per kernel category (matmul, attention, elementwise/norm, copies, optimizer, ...), the number
of kernel launches and how busy the device was (device time / wall time of the profiled run; the rest is launch
overhead, host syncs and Python). The generate stage is also timed piece by piece (LoRA injection, generation with
blending, the two VAE decodes, PNG encoding), as ``bench/edit.py`` reports it as one number.

Writes ``profile_edit_<device>.json`` (everything) and ``profile_edit_<device>.txt`` (the tables) into ``--out-dir``
(``profile_training_<device>.*`` with ``--only-training``). Both are claimed before any work
(``editinfinity.file_outputs``): an existing file of those names needs ``--overwrite``, which replaces only an
earlier profile (never another file); each is put in place with one atomic rename.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from editinfinity.edit.case import CaseSpec
from editinfinity.edit.generate import blend_hook, to_pil
from editinfinity.edit.lora import lora_adapter, lora_config, lora_loss, lora_parameters, lora_text
from editinfinity.edit.prepare import prepare_case
from editinfinity.edit.prompt_tuning import prompt_tuning_loss
from editinfinity.edit.settings import EditSettings
from editinfinity.edit.training import (
    learning_rate,
    make_generator,
    on_device,
    stage_checkpoint_blocks,
    training_mode,
)
from editinfinity.file_outputs import claim_file, claim_report
from editinfinity.interrupts import run_script
from editinfinity.models import schedules
from editinfinity.models.bundle import load_models
from editinfinity.models.infinity import TextConditionCache
from editinfinity.models.quantizer import scale_codes_on_grid
from editinfinity.scratch import scratch_dir

#: Kernel name patterns -> category (first match wins; names are lower-cased).
CATEGORIES = [
    ("compiled (triton)", r"^triton_"),  # first: fused kernel names list their ops ("to_copy", "add", ...)
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_|matmul|dot_|aten::(mm|addmm|bmm|linear)$"),
    ("convolution", r"conv|implicit|winograd|cudnn"),
    ("optimizer", r"adam|multi_tensor|foreach|clip"),
    ("copy/memset", r"memcpy|memset|copy_|catarray|cat_|to_copy"),
    ("dropout/random", r"dropout|bernoulli|philox|rand|uniform"),
    ("norm/reduction", r"norm|reduce|mean|sum|welford"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|gelu|mul|add|where|index"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], object], device: torch.device, warmup: int, timed: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(timed):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds_median": statistics.median(times), "seconds_all": times, "peak_gpu_memory_gb": peak}


def profiled(fn: Callable[[], object], device: torch.device, row_limit: int) -> tuple[dict, str]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        elapsed = time.perf_counter() - t
    events = prof.events()
    if device.type == "cuda":
        rows = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        what = "kernels by device time"
    else:
        rows = [(e.name, e.self_cpu_time_total) for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        what = "operators by self CPU time"
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in rows:
        by_name[name][0] += us
        by_name[name][1] += 1
    total_us = sum(v[0] for v in by_name.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:row_limit]
    cats: dict[str, float] = defaultdict(float)
    for name, (us, _) in by_name.items():
        cats[category(name)] += us
    summary = {
        "wall_seconds_profiled": elapsed,
        "listed": what,
        "device_seconds": total_us / 1e6 if device.type == "cuda" else None,
        "device_busy_fraction": (total_us / 1e6) / elapsed if device.type == "cuda" else None,
        "kernel_launches": sum(v[1] for v in by_name.values()) if device.type == "cuda" else None,
        "categories": {k: {"seconds": v / 1e6, "share": v / total_us}
                       for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n, "seconds": us / 1e6, "calls": c, "share": us / total_us, "category": category(n)}
                for n, (us, c) in top],
    }
    lines = [f"  wall {elapsed:.4f} s (profiled)" + (
        f", device busy {summary['device_seconds']:.4f} s ({100 * summary['device_busy_fraction']:.1f} %), "
        f"{summary['kernel_launches']} kernel launches" if device.type == "cuda" else "")]
    lines.append("  by category: " + ", ".join(f"{k} {100 * v['share']:.1f} %" for k, v in summary["categories"].items()))
    lines.append(f"  top {what}:")
    lines.append(f"    {'ms':>9} {'calls':>6} {'share':>6}  name")
    for row in summary["top"]:
        lines.append(f"    {1e3 * row['seconds']:9.2f} {row['calls']:6d} {100 * row['share']:5.1f}%  {row['name'][:110]}")
    return summary, "\n".join(lines)


def attention_backends(schedule, heads: int, head_dim: int, device: torch.device, warmup: int, timed: int) -> dict:
    """Forward + backward of one block's block-causal self-attention (one SDPA call per scale on the key prefix,
    as SelfAttention does) in bf16 with each SDPA kernel: median seconds and the largest difference to flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lengths = schedules.scale_lengths(schedule)
    L = sum(lengths)
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    qkv = [torch.randn(1, heads, L, head_dim, generator=g, device=device, dtype=dtype).requires_grad_(True)
           for _ in range(3)]
    grad_out = torch.randn(1, heads, L, head_dim, generator=g, device=device, dtype=dtype)

    def run():
        for t in qkv:
            t.grad = None
        q, k, v = qkv
        outs, end = [], 0
        for n in lengths:
            start, end = end, end + n
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=1.0))
        out = torch.cat(outs, dim=2)
        out.backward(grad_out)
        return [out.detach(), *(t.grad.detach() for t in qkv)]

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if device.type != "cuda":
        backends = {"math": SDPBackend.MATH}
    results, reference = {}, None
    for name, backend in backends.items():
        try:
            with sdpa_kernel([backend]):
                w = wall(run, device, warmup, timed)
                outs = run()
            reference = reference if reference is not None else outs
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, reference, strict=True))
            results[name] = {"seconds_median": w["seconds_median"], "max_abs_diff_to_first": diff}
        except RuntimeError as exc:  # the kernel does not take these shapes or is not built
            results[name] = {"error": str(exc).splitlines()[0][:200]}
    return results


def bench_case(models, resolution: str, directory: Path):
    """The bundled example scene at the schedule's pixel size (as bench/edit.py), prepared."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from edit import bench_image

    image, case, _ = bench_image(directory, resolution)
    spec = CaseSpec(image=str(image), prompt=case["prompt"], edit_prompt=case["edit_prompt"], mode="auto",
                    target_word=case["target_word"], resolution=resolution)
    return prepare_case(models, spec)


#: What every profile of this script holds (what --overwrite may replace).
REPORT_KEYS = ("preset", "tokens", "regions", "checkpoint_blocks")
#: How the text profile starts (what --overwrite may replace).
TEXT_START = "profile of one edit's pieces:"


def _is_profile_text(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(len(TEXT_START)) == TEXT_START
    except (OSError, UnicodeDecodeError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2b-random")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", default=None)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    ap.add_argument("--checkpointing", default="auto")
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                    help="torch.compile of the training blocks (auto: on CUDA); the first updates compile")
    ap.add_argument("--only-training", action="store_true", help="profile the two updates only")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timed", type=int, default=3)
    ap.add_argument("--row-limit", type=int, default=25)
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace this script's earlier profile of the same name in --out-dir (never another file)")
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    stem = (f"profile_{'training' if args.only_training else 'edit'}_"
            f"{'h200' if 'H200' in (gpu or '') else device.type}")
    out_dir = Path(args.out_dir)
    with contextlib.ExitStack() as stack:  # claimed before any work; the text file is put in place at the end
        write_json = stack.enter_context(claim_report(out_dir / f"{stem}.json", keys=REPORT_KEYS,
                                                      overwrite=args.overwrite, flag="--out-dir"))
        text_tmp = stack.enter_context(claim_file(out_dir / f"{stem}.txt", overwrite=args.overwrite,
                                                  is_ours=_is_profile_text, flag="--out-dir"))

        def save(report: dict, text_out: list[str]) -> None:
            write_json(report)
            text_tmp.write_text("\n".join(text_out) + "\n")

        profile_edit(args, device, gpu, stack.enter_context(scratch_dir("editinfinity-profile-edit")), save)
    print(f"wrote {out_dir / stem}.json and .txt")


def profile_edit(args, device: torch.device, gpu: str | None, tmp: Path,
                 save: Callable[[dict, list[str]], None]) -> None:
    """Measure (see the module docstring); ``save(report, text)`` after each part."""
    models = load_models(args.preset, device=device, dtype=args.dtype)
    from editinfinity.models.presets import get_preset

    resolution = args.resolution or get_preset(args.preset).resolution
    case = bench_case(models, resolution, tmp)
    settings = EditSettings(checkpointing=args.checkpointing, low_memory=args.low_memory, compile=args.compile)
    if settings.low_memory:
        models.offload_text_encoder()
    case = on_device(case, device, ["source_styled", "edit_styled"])
    tokens = schedules.num_tokens(case.schedule)
    model = models.transformer
    report: dict = {"preset": args.preset, "resolution": resolution, "tokens": tokens, "device": str(device),
                    "gpu": gpu,
                    "torch": torch.__version__, "frozen_dtype": str(models.frozen_dtype).removeprefix("torch."),
                    "settings": {"checkpointing": settings.checkpointing, "low_memory": settings.low_memory,
                                 "compile": settings.compile}, "regions": {}}
    text_out = [f"profile of one edit's pieces: {args.preset} at {resolution} ({tokens} tokens) on {report['gpu'] or device}, "
                f"torch {torch.__version__}, frozen weights {report['frozen_dtype']}, settings {report['settings']}"]

    def region(name: str, fn: Callable[[], object], note: str = "") -> None:
        w = wall(fn, device, args.warmup, args.timed)
        summary, table = profiled(fn, device, args.row_limit)
        report["regions"][name] = {**w, **summary, "note": note}
        peak = f", peak {w['peak_gpu_memory_gb']:.2f} GiB" if w["peak_gpu_memory_gb"] is not None else ""
        text_out.append(f"\n== {name}: {w['seconds_median']:.4f} s median{peak}{' (' + note + ')' if note else ''}")
        text_out.append(table)
        print(text_out[-2], flush=True)

    # 1. one prompt-tuning update (forward, backward to the rows, clip, AdamW step)
    n_ckpt = stage_checkpoint_blocks(models, case, settings)
    rows = torch.zeros(settings.style_rows, case.text["source_styled"].channels, device=device, requires_grad=True)
    opt = torch.optim.AdamW([rows], lr=learning_rate(settings, models), fused=device.type == "cuda" or None)
    gen = make_generator(device, 0)

    def prompt_update():
        opt.zero_grad(set_to_none=True)
        loss = prompt_tuning_loss(models, case, rows, settings, gen)
        if loss.requires_grad:
            loss.backward()
            torch.nn.utils.clip_grad_norm_([rows], settings.grad_clip)
        opt.step()

    with training_mode(model, settings, checkpoint_blocks=n_ckpt):
        region("prompt_tuning_update", prompt_update, f"{n_ckpt} blocks checkpointed")
    report["checkpoint_blocks"] = n_ckpt
    rows = rows.detach()

    # 2. one LoRA update (cached text path, as the stage)
    with lora_adapter(model, lora_config(settings), seed=0) as m:
        params = lora_parameters(m)
        lopt = torch.optim.AdamW(params, lr=learning_rate(settings, models), fused=device.type == "cuda" or None)
        cache = TextConditionCache(m, lora_text(models, case, rows, settings))

        def lora_update():
            lopt.zero_grad(set_to_none=True)
            lora_loss(models, case, rows, settings, gen, cache).backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            lopt.step()

        with training_mode(m, settings, checkpoint_blocks=n_ckpt):
            region("lora_update", lora_update, f"{n_ckpt} blocks checkpointed")
        state = {k: v.detach().clone() for k, v in m.state_dict().items() if "lora_" in k}
    if args.only_training:
        save(report, text_out)
        print("\n".join(text_out))
        return

    # 3. one generation: plain (the bench/generate.py figure) and as the generate stage runs it (LoRA + blending)
    text = case.text["edit_styled"].append_rows(rows)

    def generation(hook=None):
        with torch.no_grad(), models.autocast():
            return model.generate(text, case.schedule, cfg=settings.cfg, tau=settings.tau, top_k=settings.top_k,
                                  top_p=settings.top_p, generator=make_generator(device, 0), on_scale=hook)

    region("generation", generation, "CFG, KV cache, no LoRA")
    grid = schedules.last_grid(case.schedule)
    weights = torch.ones(grid)
    weights[grid[0] // 4:, grid[1] // 4:] = 0.0
    source = scale_codes_on_grid([b.to(device) for b in case.bits], case.schedule)
    hook = blend_hook(source, weights)
    pieces: dict[str, float] = {}

    def timed_piece(name, fn):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        pieces[name] = time.perf_counter() - t
        return out

    def generate_stage_pieces() -> None:
        pieces.clear()
        adapter = lora_adapter(model, lora_config(settings), None, seed=0)
        m = timed_piece("lora_inject", adapter.__enter__)
        try:
            m.load_state_dict(state, strict=False)
            out = timed_piece("generation_lora_blend", lambda: generation(hook))
            with torch.no_grad(), models.autocast():
                img = timed_piece("vae_decode_edit", lambda: models.vae.decode(out.summed_codes))
                recon = timed_piece("vae_decode_reconstruction", lambda: models.vae.decode_bits(
                    [b.to(device) for b in case.bits], case.schedule))
        finally:
            timed_piece("lora_remove", lambda: adapter.__exit__(None, None, None))
        pil = timed_piece("to_pil", lambda: (to_pil(img), to_pil(recon)))
        timed_piece("png_encode", lambda: [p.save(io.BytesIO(), format="PNG", compress_level=1) for p in pil])

    generate_stage_pieces()  # warm-up
    generate_stage_pieces()
    report["generate_stage_pieces_seconds"] = dict(pieces)
    text_out.append("\n== generate stage, piece by piece (s): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in pieces.items()))
    print(text_out[-1], flush=True)
    with lora_adapter(model, lora_config(settings), None, seed=0) as m:
        m.load_state_dict(state, strict=False)
        region("generation_lora_blend", lambda: generation(hook), "as the generate stage: LoRA + per-scale blending")

    codes = source[0]
    for c in source[1:]:
        codes = codes + c

    def vae_decode():
        with torch.no_grad(), models.autocast():
            return models.vae.decode(codes)

    region("vae_decode", vae_decode, "one decode of summed codes (the generate stage runs two)")

    save(report, text_out)  # before the kernel comparison, which tries kernels that may not take these shapes
    cfg = model.config
    attn = attention_backends(case.schedule, cfg.num_heads, cfg.embed_dim // cfg.num_heads, device, args.warmup,
                              args.timed)
    report["attention_backends_one_block_fwd_bwd"] = attn
    text_out.append("\n== self-attention of one block, forward + backward, per SDPA kernel: " + ", ".join(
        f"{k} {v['seconds_median'] * 1e3:.2f} ms (max diff {v['max_abs_diff_to_first']:.2e})" if "error" not in v
        else f"{k}: {v['error']}" for k, v in attn.items()))
    print(text_out[-1], flush=True)

    save(report, text_out)
    print("\n".join(text_out))


if __name__ == "__main__":
    sys.exit(run_script(main))
