"""``editinfinity eval ...``: quality evaluation commands (registered by the main CLI through
:func:`add_eval_parser`; ``editinfinity bench ...`` is the old name, kept as an alias).

``editinfinity eval piebench --data DIR --mode auto|mask|whole --out DIR [--preset NAME] [--types 0,1,...]
[--limit N] [--clip ID] [--dino ID] [--lpips DIR]`` edits every selected PIE-Bench case (resuming an interrupted
run in the same ``--out``), scores them as PnP-Inversion does and writes ``results.csv``, ``table.md``,
``table.html`` and ``grids/``. ``editinfinity eval toy-piebench --out DIR`` writes a small PIE-Bench-format data set
from the toy world.
"""

from __future__ import annotations

import argparse
import logging

from ..cli_options import OVERWRITE_HELP, THRESHOLD_HELP
from ..edit.modes import MODES
from ..errors import InvalidCaseError

log = logging.getLogger(__name__)


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit takes a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--limit must be >= 1, got {value}")
    return value


def _cmd_piebench(args: argparse.Namespace) -> int:
    from ..edit.settings import EditSettings
    from .piebench import parse_types
    from .piebench_metrics import MetricModels
    from .piebench_run import run_piebench

    types = parse_types(args.types)
    settings = EditSettings.from_profile(args.profile, seed=args.seed, prompt_iters=args.prompt_iters,
                                         lora_iters=args.lora_iters, threshold=args.threshold)
    metric_models = MetricModels.load(clip=args.clip, dino=args.dino, lpips=args.lpips,
                                      device=args.metrics_device or args.device)
    result = run_piebench(args.data, args.out, mode=args.mode, types=types, limit=args.limit, preset=args.preset,
                          weights=args.weights, device=args.device, resolution=args.resolution, settings=settings,
                          metric_models=metric_models, edit=not args.score_only,
                          progress=not getattr(args, "quiet", False))
    not_computed = [k for k, v in metric_models.describe().items() if v is None]
    print(f"{result.ok} cases scored ({result.edited} edited now, {result.resumed} already done), "
          f"{result.failed} failed, {result.invalid_entries} malformed entries")
    if not_computed:
        print(f"not computed (no weights given): {', '.join(not_computed)}; pass --clip / --dino / --lpips")
    print(f"table: {result.files['markdown']}\nper case: {result.files['csv']}\npage: {result.files['html']}")
    return 1 if result.failed or result.invalid_entries else 0


def _cmd_toy(args: argparse.Namespace) -> int:
    from ..outputs import claim_output, precheck_output

    precheck_output(args.out, overwrite=args.overwrite)  # before the toy world's imports
    from .toy import TOY_TYPES, build_toy_piebench

    types = tuple(int(t) for t in args.types.split(",")) if args.types else TOY_TYPES
    bad = sorted(set(types) - set(TOY_TYPES))
    if bad:
        raise InvalidCaseError(f"--types {bad} have no toy-world version; choose from {TOY_TYPES}")
    with claim_output(args.out, overwrite=args.overwrite, what="toy-piebench") as tmp:
        build_toy_piebench(tmp, per_type=args.per_type, types=types, seed=args.seed)
    print(args.out)
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``editinfinity eval piebench`` and ``editinfinity eval toy-piebench`` (alias ``bench``) on the
    main CLI's subparsers; each sets ``handler`` (returns the exit code: 0, or 1 when some case failed)."""
    bench = subparsers.add_parser("eval", aliases=["bench"], help="quality evaluation: PIE-Bench editing and metrics")
    cmds = bench.add_subparsers(dest="bench_command", required=True)

    p = cmds.add_parser("piebench", help="edit and score PIE-Bench (PnP-Inversion's protocol)",
                        description=__doc__.split("\n\n")[1])
    p.add_argument("--data", required=True, help="PIE-Bench folder holding mapping_file.json and annotation_images/ "
                                                 "(local path, gs:// or s3://)")
    p.add_argument("--mode", required=True, choices=MODES,
                   help="auto: attention mask from the target word (whole image when an entry has none); "
                        "mask: the annotation mask; whole: no mask")
    p.add_argument("--out", required=True, help="output folder; an existing one is resumed")
    p.add_argument("--types", default=None, help="edit types to run, e.g. 0,1,9 (default: all)")
    p.add_argument("--limit", type=_limit, default=None, help="only the first N selected entries")
    p.add_argument("--preset", default=None, help="model preset (default: toy when bundled, else tiny; 2b with "
                                                  "--weights for the paper)")
    p.add_argument("--weights", default=None, help="directory or hub id written by `editinfinity convert`")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--resolution", default=None, choices=("0.06M", "0.25M", "0.60M", "1M"),
                   help="pixel budget (default: the preset's; the paper uses 1M)")
    p.add_argument("--profile", default="default", choices=("default", "reference"),
                   help="settings profile of the edits (see `editinfinity edit --help`)")
    p.add_argument("--seed", type=int, default=None, help="seed of every edit (default: the profile's)")
    p.add_argument("--prompt-iters", type=int, default=None, help="prompt-tuning updates (default 10)")
    p.add_argument("--lora-iters", type=int, default=None, help="LoRA updates (default 50)")
    p.add_argument("--threshold", type=float, default=None, help=THRESHOLD_HELP)
    p.add_argument("--clip", default=None, metavar="PATH|HUB_ID",
                   help="CLIP weights (openai/clip-vit-large-patch14 in the paper); without: CLIP not computed")
    p.add_argument("--dino", default=None, metavar="PATH|HUB_ID",
                   help="DINO ViT-B/8: a transformers folder / hub id (facebook/dino-vitb8) or the official "
                        "dino_vitbase8_pretrain.pth; without: structure distance not computed")
    p.add_argument("--lpips", default=None, metavar="DIR",
                   help="folder with torchvision's squeezenet1_1-*.pth and LPIPS v0.1 squeeze.pth; "
                        "without: LPIPS not computed")
    p.add_argument("--metrics-device", default=None, help="device of the metric models (default: --device)")
    p.add_argument("--score-only", action="store_true", help="edit nothing; score the finished cases")
    p.set_defaults(handler=_cmd_piebench)

    t = cmds.add_parser("toy-piebench", help="write a small PIE-Bench-format data set from the toy world")
    t.add_argument("--out", required=True, help="folder to write the PIE-Bench-format set into (or gs:// / s3:// URI)")
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    t.add_argument("--per-type", type=int, default=4, help="cases per edit type (default 4)")
    t.add_argument("--types", default=None, help="comma-separated subset of 0,1,2,3,6,8")
    t.add_argument("--seed", type=int, default=0, help="seed of the generated scenes (default 0)")
    t.set_defaults(handler=_cmd_toy)
    return bench
