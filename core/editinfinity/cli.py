"""The ``editinfinity`` command: one edit end to end, each stage on its own, conversion, pipelines, demo."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from .cli_options import (
    CORE_HELP,
    FILL_HOLES_HELP,
    ITERS,
    KEEP_PIXELS_HELP,
    MIN_REGION_HELP,
    MODES,  # noqa: F401  (re-exported)
    OVERWRITE_HELP,
    SEED,
    SEED_HELP,
    THRESHOLD_HELP,
    fraction,
)
from .cli_options import add_case_args as _add_case_args
from .cli_options import add_model_args as _add_model_args
from .cli_options import add_settings_args as _add_settings_args
from .cli_options import add_speed_args as _add_speed_args
from .cli_options import settings_default as _settings_default
from .cli_options import settings_from_args as _settings
from .edit.settings import BAND_SETTINGS
from .errors import EditInfinityError, InvalidCaseError

log = logging.getLogger("editinfinity")

def _mode(args) -> str:
    if args.target_word:
        return "auto"
    if args.mask:
        return "mask"
    if args.whole_image:
        return "whole"
    raise InvalidCaseError("choose a mode: --target-word WORD (automatic mask), --mask MASK (user mask) "
                           "or --whole-image")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2); the subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``editinfinity`` parser; ``argv`` (when given) says which plugin command to load (see below)."""
    parser = _Parser(prog="editinfinity", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # The same flags after the subcommand (`editinfinity edit ... -q`); SUPPRESS keeps the main parser's defaults.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (-vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def add_parser(name, **kw):
        return add(name, parents=[common], **kw)

    sub.add_parser = add_parser

    p = sub.add_parser("edit", help="run a whole edit (all stages, one process)")
    _add_case_args(p)
    p.add_argument("--case", help="case file (YAML/JSON) or a directory in the reference layout")
    p.add_argument("--out", required=True, help="output directory (or gs:// / s3:// URI)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_model_args(p)
    _add_settings_args(p)
    _add_speed_args(p)

    p.add_argument("--learned", metavar="DIR",
                   help="learned state of the image (folder or URI written by `editinfinity learn`): only the edit "
                        "runs; --image and --prompt come from it")
    p.add_argument("--learned-cache", metavar="DIR",
                   help="folder of learned states keyed by content (image pixels, prompt, resolution, weights, "
                        "learning settings): the image is learned there once and reused by later edits")

    p = sub.add_parser("learn", help="learn an image once (prompt tuning + LoRA) for any number of `edit --learned`")
    p.add_argument("--image", required=True, help="source image (path or gs:// / s3:// URI)")
    p.add_argument("--prompt", required=True, help="prompt describing the source image")
    p.add_argument("--resolution", default=None, choices=("0.06M", "0.25M", "0.60M", "1M"),
                   help="pixel budget (default: the preset's)")
    p.add_argument("--out", required=True, help="learned folder to write (or gs:// / s3:// URI)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_model_args(p)
    _add_settings_args(p)
    _add_speed_args(p)

    p = sub.add_parser("demo", help="edit a bundled example with the default preset and write the report")
    p.add_argument("--out", default="demo_output", help="output directory (default demo_output)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_model_args(p)

    p = sub.add_parser("prepare", help="stage A: encode the image codes and the prompts")
    _add_case_args(p)
    p.add_argument("--case", help="case file (YAML/JSON) or reference-layout directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_model_args(p)

    for name, helptext in (("tune-prompt", "stage B: learn the language-style rows"),
                           ("train-lora", "stage C: train the LoRA adapter"),
                           ("attention", "stage D: target-word cross-attention map"),
                           ("mask", "stage E: edit mask and smoothing weights"),
                           ("generate", "stage G: generate and blend the edit")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--case-dir", required=True, help="directory written by `editinfinity prepare`")
        p.add_argument("--out", required=True, help="output stage directory")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        if name in ("train-lora", "generate"):
            p.add_argument("--prompt-dir", required=True, help="directory written by tune-prompt")
        if name == "generate":
            p.add_argument("--lora-dir", required=True, help="directory written by train-lora")
            p.add_argument("--mask-dir", help="directory written by mask (modes auto and mask)")
            p.add_argument("--keep-pixels", action=argparse.BooleanOptionalAction,
                           default=_settings_default("keep_pixels"), help=KEEP_PIXELS_HELP)
        if name == "mask":
            p.add_argument("--attention-dir", help="directory written by attention (mode auto)")
            # defaults from EditSettings, so this stage command and `edit` cannot drift apart
            p.add_argument("--threshold", type=fraction, default=_settings_default("threshold"),
                           help=THRESHOLD_HELP)
            p.add_argument("--core-threshold", type=float, default=_settings_default("core"), dest="core",
                           help=CORE_HELP)
            p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction,
                           default=_settings_default("fill_holes"), help=FILL_HOLES_HELP)
            p.add_argument("--min-region", type=float, default=_settings_default("min_region"), help=MIN_REGION_HELP)
            p.add_argument("--band", choices=BAND_SETTINGS, default=_settings_default("band"),
                           help="smoothing band (see `editinfinity edit --help`)")
        else:
            _add_model_args(p)
        if name in ("tune-prompt", "train-lora", "generate"):
            p.add_argument("--seed", type=SEED, default=0, help=SEED_HELP + " (default 0)")
        if name == "tune-prompt":
            p.add_argument("--iters", type=ITERS, default=10, help="prompt-tuning optimizer updates (default 10)")
        if name == "train-lora":
            p.add_argument("--iters", type=ITERS, default=50, help="LoRA optimizer updates (default 50)")

    p = sub.add_parser("convert", help="convert official .pth weights to the safetensors directory layout")
    p.add_argument("--transformer", help="infinity_2b_reg.pth")
    p.add_argument("--vae", help="infinity_vae_d32reg.pth")
    p.add_argument("--text-encoder", help="T5 directory or hub id (google/flan-t5-xl)")
    p.add_argument("--preset", default="2b",
                   help="preset whose architecture the .pth files hold (default 2b; see --preset of `edit`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = sub.add_parser("clean", help="remove what runs killed by SIGKILL left beside their --out")
    p.add_argument("folders", nargs="*", default=["."],
                   help="folders holding --out directories (default: the current folder)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")

    _add_extra_commands(sub)
    _add_plugin_commands(sub, argv)
    return parser


def _add_extra_commands(sub) -> None:
    """Commands of optional parts of the library (training, evaluation) register themselves here."""
    from .evaluation.cli import add_eval_parser

    add_eval_parser(sub)
    from .batch.cli import add_batch_parser

    add_batch_parser(sub)
    try:
        from .train.cli import add_train_parser
    except ImportError:  # pragma: no cover - the training module is part of the package
        pass
    else:
        add_train_parser(sub)


#: Entry-point group through which other packages add commands (``pipeline`` comes from ``pipelines.cli``).
PLUGIN_GROUP = "editinfinity.cli"


def _add_plugin_commands(sub, argv: list[str] | None) -> None:
    """Commands contributed through the ``editinfinity.cli`` entry points (each a ``register(subparsers)``).

    Only the plugin ``argv`` asks for is imported (so ``editinfinity edit`` never imports kfp); the others get a
    placeholder that lists them in ``--help``. With ``argv`` None (a parser built from Python) every plugin that
    imports is registered.
    """
    from importlib.metadata import entry_points

    wanted = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name in sub.choices:
            continue
        if argv is None or ep.name == wanted:
            try:
                register = ep.load()
            except ImportError as exc:
                if argv is not None:
                    raise EditInfinityError(f"`editinfinity {ep.name}` needs an optional dependency ({exc}); "
                                            "install it with pip install 'editinfinity[pipeline]'") from None
            else:
                register(sub)
                continue
        sub.add_parser(ep.name, help=f"{ep.name} commands (from {ep.value.split(':')[0]})", add_help=False)


#: Case fields that a flag given with --case replaces (the summary lists what it replaced).
CASE_FLAGS = {"image": "--image", "prompt": "--prompt", "edit_prompt": "--edit-prompt", "resolution": "--resolution",
              "mask_polarity": "--mask-polarity"}
CASE_FIELDS = ("image", "prompt", "edit_prompt", "mode", "target_word", "mask", "mask_polarity", "resolution")


def _case_kwargs(args) -> tuple[dict, dict]:
    """The case fields of the command, and what ``summary.json`` records about where they came from.

    With ``--case``: the file's run settings (``seed``, ``prompt_iters``, ``lora_iters``, ``threshold``, ``preset``)
    are used where the matching flag is not given; flags given with ``--case`` replace the file's values, and
    ``overrides`` lists every value they replaced. A case file without ``resolution`` gets the preset's.
    """
    from .edit.case import RUN_SETTINGS, CaseSpec, read_case_file

    notes: dict = {}
    if not getattr(args, "case", None):
        missing = [f"--{n.replace('_', '-')}" for n in ("image", "prompt", "edit_prompt") if getattr(args, n) is None]
        if missing:
            raise InvalidCaseError(f"missing {', '.join(missing)} (or give --case FILE)")
        kw = {"image": args.image, "prompt": args.prompt, "edit_prompt": args.edit_prompt, "mode": _mode(args),
              "target_word": args.target_word, "mask": args.mask,
              "mask_polarity": args.mask_polarity or "white-edit", "resolution": args.resolution}
    else:
        path = Path(_local_input(args.case, "--case"))
        source = f"case file {args.case}"
        notes["case_file"] = args.case
        from_file: dict = {}
        if path.is_dir():
            spec = CaseSpec.from_reference_dir(path)
            kw = {k: getattr(spec, k) for k in CASE_FIELDS}
            kw["resolution"] = None
            given = set(CASE_FIELDS) - {"resolution"}
        else:
            raw = read_case_file(path)
            spec = CaseSpec.from_dict(raw, base_dir=path.parent, source=source, check_files=True)
            from_file = spec.run_settings
            kw = {k: getattr(spec, k) for k in CASE_FIELDS}
            kw["resolution"] = raw.get("resolution")  # absent: the preset's default, as without a case file
            given = set(raw) - set(RUN_SETTINGS)
        overrides: dict = {}
        for key, value in from_file.items():
            flag_value = getattr(args, key, None)
            if flag_value is None:
                setattr(args, key, value)
            elif flag_value != value:
                overrides[key] = {"case_file": value, "command_line": flag_value}
        for key in CASE_FLAGS:
            value = getattr(args, key, None)
            if value is not None:
                value = _local_input(value, CASE_FLAGS[key]) if key == "image" else value
                if key in given and kw[key] != value:
                    overrides[key] = {"case_file": kw[key], "command_line": value}
                kw[key] = value
        if args.target_word or args.mask or args.whole_image:
            flags = {"mode": _mode(args), "target_word": args.target_word,
                     "mask": _local_input(args.mask, "--mask") if args.mask else None}
            for key, value in flags.items():
                if kw[key] != value:
                    overrides[key] = {"case_file": kw[key], "command_line": value}
            kw.update(flags)
        if overrides:
            notes["overrides"] = overrides
            log.info("flags given with --case replace %s of %s", ", ".join(overrides), args.case)
    kw = _local_inputs({k: kw.get(k) for k in CASE_FIELDS})
    if kw["mode"] == "auto" and isinstance(kw["target_word"], str) and isinstance(kw["prompt"], str):
        from .models.text import split_occurrence, target_occurrences

        word, picked = split_occurrence(kw["target_word"])
        count = target_occurrences(kw["prompt"], word)
        if picked is not None and count and picked >= count:
            raise InvalidCaseError(f"target word {word!r} occurs {count} time(s) in the prompt; write {word}#1 .. "
                                   f"{word}#{count}")
        if count > 1:
            notes["target_word"] = {"occurrences": count, "edited": 1 + (picked or 0)}
    return kw, notes


def _local_input(value: str, flag: str) -> str:
    """A local path for an input given as a path, file:// URI (used in place) or gs:// / s3:// URI (fetched once
    into the cache); a malformed URI is refused naming the flag."""
    from . import storage

    try:
        u = storage.parse_uri(value)
    except storage.InvalidURIError as exc:
        raise storage.InvalidURIError(f"{flag}: {exc}") from None
    return str(storage.cached_path(value)) if u.is_remote else str(u.path)


def _local_inputs(kw: dict) -> dict:
    """``image`` and ``mask`` as local paths (see :func:`_local_input`)."""
    for key in ("image", "mask"):
        value = kw.get(key)
        if isinstance(value, str) and value:
            kw[key] = _local_input(value, f"--{key}")
    return kw


def _with_notes(out_dir, notes: dict) -> None:
    """Add ``notes`` (case file, replaced values) to the ``summary.json`` of a finished, not yet published edit."""
    if not notes:
        return
    import json

    from .edit.artifacts import write_json

    path = Path(out_dir) / "summary.json"
    write_json(path, {**json.loads(path.read_text()), **notes})


def _claim(args, *inputs, what: str | None = None):
    """The command's ``--out``, claimed before any model loads (see :mod:`editinfinity.outputs`)."""
    from .outputs import claim_output

    return claim_output(args.out, overwrite=args.overwrite, inputs=[i for i in inputs if i],
                        what=what or args.command)


def _quiet_libraries() -> None:
    """``-q``: no progress bars from the libraries either (transformers' and huggingface_hub's weight loading)."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is first imported
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _run(args) -> int:
    if hasattr(args, "handler"):  # pipeline / training / benchmark commands (they need not import torch)
        return int(args.handler(args) or 0)
    if args.command == "clean":
        from .outputs import clean

        for line in clean(args.folders, dry_run=args.dry_run) or ["nothing to clean"]:
            print(line)
        return 0
    if hasattr(args, "out") and hasattr(args, "overwrite"):  # before the heavy imports below (seconds)
        from .outputs import precheck_output

        precheck_output(args.out, overwrite=args.overwrite,
                        inputs=[getattr(args, n, None) for n in INPUT_OPTIONS])
    if args.quiet:
        _quiet_libraries()
    from .edit import stages

    progress = not args.quiet
    if args.command == "edit" and args.learned:
        return _edit_learned(args, progress)
    if args.command == "learn":
        return _learn(args, progress)
    if args.command == "edit":
        kw, notes = _case_kwargs(args)
        with _claim(args, kw.get("image"), kw.get("mask"), getattr(args, "case", None)) as out_dir:
            stages.run_edit(out_dir, **kw, preset=args.preset, weights=args.weights, device=args.device,
                            settings=_settings(args), overwrite=args.overwrite, progress=progress,
                            learned_cache=args.learned_cache)
            _with_notes(out_dir, notes)
        where = args.out.rstrip("/")
        print(f"edited image: {where}/edited.png\nreport: {where}/report.html")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        with _claim(args) as out_dir:
            run_demo(out_dir, preset=args.preset, weights=args.weights, device=args.device, progress=progress,
                     overwrite=args.overwrite)
        print(f"demo edit written to {args.out}/ (open {args.out}/report.html)")
        return 0
    if args.command == "prepare":
        from .models.bundle import load_models

        kw, _ = _case_kwargs(args)
        with _claim(args, kw.get("image"), kw.get("mask"), getattr(args, "case", None)) as out_dir:
            models = load_models(args.preset, weights=args.weights, device=args.device)
            stages.prepare(out_dir, **kw, models=models, overwrite=args.overwrite)
        print(args.out)
        return 0
    if args.command == "convert":
        from .models.checkpoints import convert_official

        with _claim(args, args.transformer, args.vae, args.text_encoder) as out_dir:
            convert_official(out_dir, preset=args.preset, transformer=args.transformer, vae=args.vae,
                             text_encoder=args.text_encoder, overwrite=args.overwrite)
        print(args.out)
        return 0
    dirs = [getattr(args, n, None) for n in ("case_dir", "prompt_dir", "lora_dir", "mask_dir", "attention_dir")]
    if args.command in ("tune-prompt", "train-lora", "attention", "generate"):
        from .edit.prepare import load_case
        from .edit.settings import EditSettings
        from .models.bundle import load_models

        case = load_case(args.case_dir)
        with _claim(args, *dirs) as out_dir:
            # the prompts' T5 features are in the case: these stages need no text encoder
            models = load_models(args.preset or case.preset, weights=args.weights, device=args.device,
                                 text_encoder=False)
            if args.command == "tune-prompt":
                stages.tune_prompt(args.case_dir, out_dir, iters=args.iters, seed=args.seed, models=models,
                                   overwrite=args.overwrite, progress=progress)
            elif args.command == "train-lora":
                stages.train_lora(args.case_dir, args.prompt_dir, out_dir, iters=args.iters, seed=args.seed,
                                  models=models, overwrite=args.overwrite, progress=progress)
            elif args.command == "attention":
                stages.attention(args.case_dir, out_dir, models=models, overwrite=args.overwrite)
            else:
                stages.generate(args.case_dir, args.prompt_dir, args.lora_dir, out_dir, mask_dir=args.mask_dir,
                                seed=args.seed, models=models, overwrite=args.overwrite,
                                settings=EditSettings(keep_pixels=args.keep_pixels))
        print(args.out)
        return 0
    if args.command == "mask":
        with _claim(args, *dirs) as out_dir:
            stages.make_mask(args.case_dir, out_dir, attention_dir=args.attention_dir, threshold=args.threshold,
                             band=args.band, core=args.core, fill_holes=args.fill_holes,
                             min_region=args.min_region, overwrite=args.overwrite)
        print(args.out)
        return 0
    raise InvalidCaseError(f"unknown command {args.command!r}")


def _learn(args, progress: bool) -> int:
    from .edit.learned import learn, save_learned
    from .models.bundle import load_models

    settings = _settings(args)
    image = _local_inputs({"image": args.image})["image"]
    with _claim(args, image) as out_dir:
        models = load_models(args.preset, weights=args.weights, device=args.device, bias_mode=settings.bias_mode)
        state = learn(models, image, args.prompt, resolution=args.resolution, settings=settings, progress=progress)
        state.image = args.image
        save_learned(state, out_dir, overwrite=args.overwrite)
    print(f"learned state {state.key}: {args.out}")
    return 0


def _edit_learned(args, progress: bool) -> int:
    from .edit import stages
    from .edit.images import image_digest
    from .edit.learned import edit_settings, load_learned

    state = load_learned(args.learned)
    ident = state.identity
    if args.case or args.learned_cache:
        raise InvalidCaseError("--learned takes the image and prompt from the learned state: remove "
                               f"{'--case' if args.case else '--learned-cache'}")
    if args.edit_prompt is None:
        raise InvalidCaseError("missing --edit-prompt")
    if args.prompt is not None and args.prompt != ident["prompt"]:
        raise InvalidCaseError(f"--prompt {args.prompt!r} differs from the learned prompt {ident['prompt']!r}; "
                               "leave --prompt out or learn the image with this prompt")
    if args.image is not None and image_digest(_local_inputs({"image": args.image})["image"]) != ident["image_digest"]:
        raise InvalidCaseError(f"--image {args.image} is not the learned image; leave --image out or learn it")
    if args.resolution is not None and args.resolution != ident["resolution"]:
        raise InvalidCaseError(f"--resolution {args.resolution} differs from the learned {ident['resolution']}")
    if args.profile is not None and args.profile != state.settings.profile:
        raise InvalidCaseError(f"--profile {args.profile} differs from the learned profile {state.settings.profile}")
    settings = edit_settings(state, {"seed": args.seed, "prompt_iters": args.prompt_iters,
                                     "lora_iters": args.lora_iters, "threshold": args.threshold, "band": args.band,
                                     "core": args.core, "fill_holes": args.fill_holes,
                                     "min_region": args.min_region, "keep_pixels": args.keep_pixels,
                                     "checkpointing": args.checkpointing,
                                     "low_memory": True if args.low_memory else None})
    kw = _local_inputs({"mask": args.mask})
    with _claim(args, args.learned, kw["mask"]) as out_dir:
        stages.run_edit(out_dir, edit_prompt=args.edit_prompt, mode=_mode(args), target_word=args.target_word,
                        mask=kw["mask"], mask_polarity=args.mask_polarity or "white-edit",
                        preset=args.preset or ident["preset"],
                        weights=args.weights, device=args.device, settings=settings, overwrite=args.overwrite,
                        progress=progress, learned=state)
    where = args.out.rstrip("/")
    print(f"edited image: {where}/edited.png\nreport: {where}/report.html")
    return 0


#: Options naming what a command reads (an --out may never be one of them, their folder or a folder holding them).
INPUT_OPTIONS = ("image", "mask", "case", "learned", "case_dir", "prompt_dir", "lora_dir", "mask_dir",
                 "attention_dir", "transformer", "vae", "text_encoder")
#: Options that take a local path or a name that is not a path (a hub id): a ``file://`` URI becomes its path.
PATH_OR_NAME_OPTIONS = ("weights", "transformer", "vae", "text_encoder")


def _file_uris_as_paths(args) -> None:
    from .storage.uri import InvalidURIError, file_uri_path

    for name in PATH_OR_NAME_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            try:
                setattr(args, name, file_uri_path(value))
            except InvalidURIError as exc:
                raise InvalidURIError(f"--{name.replace('_', '-')}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    from . import interrupts

    previous = interrupts.install()  # first: SIGINT / SIGTERM now remove what this run wrote, exit 130 / 143
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        _file_uris_as_paths(args)
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        return _run(args)
    except EditInfinityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        code = interrupts.exit_code(exc)
        what = "terminated (SIGTERM)" if code == 143 else "interrupted"
        print(f"{what}; nothing was written to --out and this run's temporary files were removed", file=sys.stderr)
        return code
    except Exception as exc:  # a bug, not bad input: one line, the traceback with -v
        if "args" in locals() and getattr(args, "verbose", 0):
            raise
        print(f"error: internal error {type(exc).__name__}: {exc} (run with -v for the traceback and please report "
              "it)", file=sys.stderr)
        return 1
    finally:
        interrupts.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
