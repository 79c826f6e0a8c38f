"""The options the ``editinfinity`` commands share (model, case, method settings, speed), and the settings they give.

Used by the main CLI (``editinfinity.cli``) and by the command groups of subpackages (``batch.cli``), so that
neither imports the other.
"""

from __future__ import annotations

import argparse

from .edit.modes import MASK_POLARITIES, MODES  # noqa: F401  (MODES: re-exported for the CLI)
from .edit.settings import BAND_SETTINGS
from .models.presets import PRESETS, Preset


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model preset: toy (default when bundled), tiny, 2b, 2b-random, ...")
    p.add_argument("--weights", default=None, help="directory or hub id written by `editinfinity convert`")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def add_case_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--image", help="source image (path or gs:// / s3:// URI)")
    p.add_argument("--prompt", help="prompt describing the source image")
    p.add_argument("--edit-prompt", help="prompt describing the edited image")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-word", help="word (or words) of --prompt to edit: automatic-mask mode")
    g.add_argument("--mask", help="mask image (white = edit unless --mask-polarity black-edit): user-mask mode")
    g.add_argument("--whole-image", action="store_true", help="edit the whole image (no mask)")
    p.add_argument("--mask-polarity", default=None, choices=MASK_POLARITIES,
                   help="which colour of --mask marks the region to edit: white-edit (default) or black-edit "
                        "(the reference repository's mask.png files)")
    p.add_argument("--resolution", default=None, choices=("0.06M", "0.25M", "0.60M", "1M"),
                   help="pixel budget (default: the preset's)")


OVERWRITE_HELP = ("replace --out if it holds an earlier editinfinity result (never another folder, the current or "
                  "home folder, or a folder holding the inputs); the new result replaces it in one step at the end")
SEED_HELP = "seed of every random draw (integer 0 .. 2**64-1)"
CORE_HELP = ("automatic mask hysteresis: keep only regions above --threshold that reach this level somewhere "
             "(drops stray weak cells); 0 keeps every cell above the threshold, as the reference")
THRESHOLD_HELP = ("automatic mask threshold, a fraction of the attention map's range in [0, 1) (default: the "
                  "preset's, " + ", ".join(f"{p.mask_threshold} for {p.name}" for p in PRESETS.values()
                                          if p.mask_threshold != Preset.mask_threshold)
                  + f", {Preset.mask_threshold} (the method's) otherwise)")
KEEP_PIXELS_HELP = ("output the source's own pixels where the keep weight is 1 and the decoded edit where it is 0, "
                    "mixed smoothly through the band (--no-keep-pixels: the decode of the blended codes, as published)")
FILL_HOLES_HELP = "automatic mask cleanup: fill holes inside the selected regions"
MIN_REGION_HELP = ("automatic mask cleanup: drop regions smaller than this fraction of the latent grid's cells (the "
                   "largest region stays); 0 keeps every region")


def _int_in(lo: int, hi: int | None, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({what})") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({what})")
        return value

    return parse


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (a fraction in [0, 1))") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range (a fraction in [0, 1))")
    return value


#: argparse types of seeds (what torch's generators take) and of optimizer update counts.
SEED = _int_in(0, 2**64 - 1, "a seed is an integer 0 .. 2**64-1")
ITERS = _int_in(0, None, "a number of optimizer updates, 0 or more")


def settings_default(name: str):
    from .edit.settings import EditSettings

    return getattr(EditSettings(), name)


def add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=SEED, default=None, help=SEED_HELP + " (default 0)")
    p.add_argument("--prompt-iters", type=ITERS, default=None, help="prompt-tuning optimizer updates (default 10)")
    p.add_argument("--lora-iters", type=ITERS, default=None, help="LoRA optimizer updates (default 50)")
    p.add_argument("--threshold", type=fraction, default=None, help=THRESHOLD_HELP)
    p.add_argument("--core-threshold", type=float, default=None, dest="core",
                   help=f"{CORE_HELP} (default: {settings_default('core')})")
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{FILL_HOLES_HELP} (default: {settings_default('fill_holes')})")
    p.add_argument("--min-region", type=float, default=None,
                   help=f"{MIN_REGION_HELP} (default: {settings_default('min_region')})")
    p.add_argument("--keep-pixels", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{KEEP_PIXELS_HELP} (default: on; off in --profile reference)")
    p.add_argument("--band", choices=BAND_SETTINGS, default=None,
                   help="smoothing band around the mask: scaled (the reference's 1 and 4 cells of a 64-cell grid as "
                        "fractions of the image), reference (1 and 4 cells on any grid) or auto (both where they "
                        "differ, generated with the same noise; keeps the edit the model finds closest to the edit "
                        f"prompt) (default: {settings_default('band')}; reference in --profile reference)")
    p.add_argument("--profile", default=None, choices=("default", "reference"),
                   help="default (the default) or reference: reference reproduces the published code path (q/v biases off, 9 + 49 updates, batch 2)")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpointing", default=None, metavar="auto|none|all|N",
                   help="activation checkpointing of the training blocks: auto (default: as many as keep the GPU "
                        "peak near 36 GiB), none, all, or the number of blocks")
    p.add_argument("--compile", default=None, choices=("auto", "on", "off"),
                   help="torch.compile of the training blocks: auto (default: on CUDA, off on the CPU), on, off; "
                        "compiled code is cached under $EDITINFINITY_CACHE/torch-compile")
    p.add_argument("--low-memory", action="store_true",
                   help="smallest GPU footprint: checkpoint every block, move T5 off the GPU after prepare, release "
                        "cached memory between stages (slower)")


def settings_from_args(args):
    """The ``EditSettings`` the parsed options ask for (the profile's defaults for options not given)."""
    from .edit.settings import EditSettings

    return EditSettings.from_profile(args.profile or "default", seed=args.seed, prompt_iters=args.prompt_iters,
                                     lora_iters=args.lora_iters, threshold=args.threshold, band=args.band,
                                     core=args.core, fill_holes=args.fill_holes, min_region=args.min_region,
                                     keep_pixels=getattr(args, "keep_pixels", None),
                                     checkpointing=getattr(args, "checkpointing", None),
                                     low_memory=True if getattr(args, "low_memory", False) else None,
                                     compile=getattr(args, "compile", None))
