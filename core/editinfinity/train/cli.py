"""``editinfinity train-vae``, ``editinfinity train`` and ``editinfinity train-toy``.

Registered by the main CLI through :func:`add_train_parser`; each subcommand's ``handler`` returns an exit code.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _verbose(args: argparse.Namespace) -> None:
    # The main CLI logs warnings only; training progress is the point of these commands.
    if not getattr(args, "quiet", False):
        logging.getLogger("editinfinity").setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _common_args(p: argparse.ArgumentParser, default_config: Path) -> None:
    p.add_argument("--config", default=str(default_config), help=f"YAML config (default {default_config.name})")
    p.add_argument("--out", required=True, help="run directory: checkpoint/, log.jsonl, the trained model")
    p.add_argument("--minutes", type=float, help="training time budget (overrides the config; 0: none)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides the config; 0: none)")
    p.add_argument("--workers", type=int, help="scene-sampling processes (0: in the training process)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. batch_size=16")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--extend", action="store_true",
                   help="train a finished run for another --minutes/--steps (fresh warm-up and cosine cycle)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh: remove it first (only a folder holding nothing but an earlier run)")
    p.add_argument("--progress", action="store_true", help="tqdm progress bar")


def check_run_folder(args: argparse.Namespace, inputs: tuple = ()) -> None:
    """Refuse a ``--out`` this run may not train in, before any work (as the toy driver's ``--out``): a non-empty
    folder holding nothing a training run writes (``options.RUN_NAMES``); with ``--overwrite`` remove an earlier
    run's folder (only one holding nothing else, never one holding an input)."""
    from ..errors import OutputError
    from ..file_outputs import check_training_folder
    from .options import RUN_NAMES

    if args.overwrite and (args.resume or args.extend):
        raise OutputError("--overwrite starts --out afresh but --resume/--extend continue it; pass one of them")
    for remove in ((False, True) if args.overwrite else (False,)):
        check_training_folder(args.out, flag="--out", ours=RUN_NAMES, overwrite=args.overwrite, remove=remove,
                              inputs=[args.config, *inputs])


def _overrides(args: argparse.Namespace) -> dict:
    from . import common

    over = common.parse_overrides(args.set)
    for key in ("minutes", "steps", "workers"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    return over


def train_vae_command(args: argparse.Namespace) -> int:
    """``editinfinity train-vae``."""
    check_run_folder(args)  # before the heavy imports
    from . import common
    from .vae import VAEConfig, train_vae

    _verbose(args)
    cfg = common.load_config(VAEConfig, args.config, _overrides(args))
    res = train_vae(cfg, args.out, device=args.device, resume=args.resume or args.extend, extend=args.extend,
                    progress=args.progress)
    if res.heldout:
        log.info("held-out PSNR %.2f dB; model in %s", res.heldout["mean_psnr"], res.model_dir)
    return 0 if (res.model_dir / "config.json").is_file() else 1


def train_transformer_command(args: argparse.Namespace) -> int:
    """``editinfinity train``."""
    check_run_folder(args, (args.vae, args.tokenizer))  # before the heavy imports
    from . import common
    from .transformer import TransformerConfig, train_transformer

    _verbose(args)
    cfg = common.load_config(TransformerConfig, args.config, _overrides(args))
    res = train_transformer(cfg, args.out, args.vae, tokenizer_dir=args.tokenizer, device=args.device,
                            resume=args.resume or args.extend, extend=args.extend, progress=args.progress)
    return 0 if (res.transformer_dir / "config.json").is_file() else 1


def train_toy_command(args: argparse.Namespace) -> int:
    """``editinfinity train-toy``: the one-shot driver of :mod:`editinfinity.train.toy`."""
    from .toy import run

    _verbose(args)
    return run(args)


def add_train_parser(subparsers) -> None:
    """Register ``train-vae``, ``train`` and ``train-toy`` on the main CLI's subparsers."""
    from .options import TRANSFORMER_CONFIG, VAE_CONFIG, add_toy_arguments

    p = subparsers.add_parser("train-vae", help="train a BSQ VAE on toy-world pictures",
                              description="Train a BSQ VAE (reconstruction of the multi-scale quantised latent).")
    _common_args(p, VAE_CONFIG)
    p.set_defaults(handler=train_vae_command)

    p = subparsers.add_parser("train", help="train the Infinity transformer (and T5) against a trained VAE",
                              description="Train the transformer with teacher forcing and bitwise self-correction.")
    _common_args(p, TRANSFORMER_CONFIG)
    p.add_argument("--vae", required=True, help="trained VAE directory (save_pretrained layout, e.g. RUN/vae)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the bundled toy-world tokenizer)")
    p.set_defaults(handler=train_transformer_command)

    p = subparsers.add_parser("train-toy", help="train the toy preset end to end (VAE, then transformer)",
                              description="Train the toy preset within time budgets and write its weights "
                                          "directory.")
    add_toy_arguments(p)
    p.set_defaults(handler=train_toy_command)
