"""``editinfinity batch plan|work|summary|run``: the batch steps as commands (the KFP components call the same
functions); ``editinfinity batch work --part I/N`` is what a multi-GPU pod starts once per GPU."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _parts(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
        raise argparse.ArgumentTypeError(f"--part must look like I/N with 0 <= I < N, got {text!r}")
    return int(i), int(n)


def _plan_args(p: argparse.ArgumentParser) -> None:
    from ..cli_options import MASK_POLARITIES, add_model_args, add_settings_args, add_speed_args

    p.add_argument("--cases", required=True, help="JSONL cases file (path or gs:// / s3:// URI)")
    p.add_argument("--output-uri", required=True, help="results root: <output-uri>/<id>/ per case, index.html")
    p.add_argument("--shards", type=int, default=1, help="number of shards (one worker pod each)")
    p.add_argument("--resolution", default="", help="pixel budget (default: the preset's)")
    p.add_argument("--mask-polarity", default="white-edit", choices=MASK_POLARITIES,
                   help="which colour of the cases' masks marks the region to edit (default white-edit)")
    add_model_args(p)
    add_settings_args(p)
    add_speed_args(p)


def add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="many edits: plan (validate, group, shard), work (GPU), summary; or run all")
    cmds = p.add_subparsers(dest="batch_command", required=True)

    c = cmds.add_parser("plan", help="validate the cases on the CPU, group them by image, split into shards")
    _plan_args(c)
    c.add_argument("--out", required=True, help="plan file to write (JSON)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it is a plan file written earlier")
    c.set_defaults(handler=_cmd_plan)

    c = cmds.add_parser("work", help="run one shard of a plan (one process, or one per --devices entry)")
    c.add_argument("--plan", required=True, help="plan file written by `editinfinity batch plan`")
    c.add_argument("--shard", type=int, default=0, help="which shard of the plan to run (default 0)")
    c.add_argument("--part", type=_parts, default=(0, 1), help="I/N: this process's part of the shard")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1")
    c.add_argument("--devices", default=None,
                   help="one worker process per entry, e.g. cuda:0,cuda:1 (a device may repeat)")
    c.add_argument("--learned-cache", default=None, help="learned-state cache folder (shared by re-runs)")
    c.add_argument("--local-weights", default=None, help="copy the weights to this node-local folder first")
    c.set_defaults(handler=_cmd_work)

    c = cmds.add_parser("summary", help="publish the summary page (index.html) over every case's outcome")
    c.add_argument("--plan", required=True, help="plan file written by `editinfinity batch plan`")
    c.set_defaults(handler=_cmd_summary)

    c = cmds.add_parser("run", help="plan, every shard and the summary, here")
    _plan_args(c)
    c.add_argument("--devices", default=None, help="worker processes of each shard, e.g. cuda:0,cuda:1")
    c.add_argument("--learned-cache", default=None, help="learned-state cache folder (shared by re-runs)")
    c.add_argument("--plan-out", default=None, help="where to keep the plan (default: a temporary file)")
    c.add_argument("--overwrite", action="store_true", help="replace --plan-out if it is a plan file written earlier")
    c.set_defaults(handler=_cmd_run)


def _settings(args):
    from ..cli_options import settings_from_args

    return settings_from_args(args)


def _make_plan(args):
    from .cases import read_cases
    from .plan import make_plan

    return make_plan(read_cases(args.cases, args.output_uri), output_uri=args.output_uri, shards=args.shards,
                     preset=args.preset or "", weights=args.weights or "", resolution=args.resolution,
                     mask_polarity=args.mask_polarity, settings=_settings(args))


def _is_plan(path: Path) -> bool:
    """Whether ``path`` is a plan file we wrote (what ``--overwrite`` may replace)."""
    from .plan import FORMAT

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _claim_plan(path, args, flag: str):
    from ..file_outputs import claim_file

    return claim_file(path, overwrite=args.overwrite, is_ours=_is_plan, flag=flag)


def _cmd_plan(args) -> int:
    from .plan import write_plan

    with _claim_plan(args.out, args, "--out") as tmp:  # checked before the cases are read
        plan = _make_plan(args)
        write_plan(plan, tmp)
    print(json.dumps({"plan": args.out, "valid": len(plan.cases), "invalid": len(plan.invalid),
                      "groups": len(plan.groups), "shards": len(plan.shards)}))
    return 0


def _work(plan_path, plan, shard: int, args) -> list[dict]:
    from .worker import run_processes, run_shard

    kw = {"learned_cache": args.learned_cache, "local_weights": getattr(args, "local_weights", None)}
    if args.devices:
        return run_processes(plan_path, shard, args.devices.split(","), **kw)
    return run_shard(plan, shard, device=getattr(args, "device", None), part=getattr(args, "part", (0, 1)),
                     progress=not args.quiet, **kw)


def _counts(statuses: list[dict]) -> dict:
    return {s: sum(x.get("status") == s for x in statuses) for s in ("done", "failed")}


def _cmd_work(args) -> int:
    from .plan import read_plan

    plan = read_plan(args.plan)
    if not 0 <= args.shard < max(len(plan.shards), 1):
        raise SystemExit(f"error: shard {args.shard} does not exist: the plan has {len(plan.shards)} shards")
    statuses = _work(args.plan, plan, args.shard, args) if plan.shards else []
    print(json.dumps({"shard": args.shard, **_counts(statuses)}))
    return 0


def _cmd_summary(args) -> int:
    from .outcomes import publish_summary, summarize_batch
    from .plan import read_plan

    plan = read_plan(args.plan)
    summary = summarize_batch(plan)
    page = publish_summary(plan, summary)
    print(json.dumps({"summary": page, **summary.counts}))
    return 0


def _cmd_run(args) -> int:
    from ..scratch import scratch_dir
    from .outcomes import publish_summary, summarize_batch
    from .plan import write_plan

    if args.plan_out:
        from ..file_outputs import check_file

        check_file(args.plan_out, overwrite=args.overwrite, is_ours=_is_plan, flag="--plan-out")
    plan = _make_plan(args)
    with scratch_dir("editinfinity-batch") as tmp:
        plan_path = Path(tmp) / "plan.json"
        if args.plan_out:
            with _claim_plan(args.plan_out, args, "--plan-out") as kept:
                write_plan(plan, kept)
            plan_path = Path(args.plan_out)
        else:
            write_plan(plan, plan_path)
        for shard in range(len(plan.shards)):
            _work(plan_path, plan, shard, args)
    summary = summarize_batch(plan)
    page = publish_summary(plan, summary)
    print(json.dumps({"summary": page, **summary.counts}))
    return 0

