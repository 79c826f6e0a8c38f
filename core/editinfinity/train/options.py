"""The training commands' options and config files, without the training code (building the ``editinfinity``
parser must not import torch: every command pays for what its parser imports)."""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
VAE_CONFIG = CONFIG_DIR / "toy_vae.yaml"
TRANSFORMER_CONFIG = CONFIG_DIR / "toy_transformer.yaml"
#: What ``train_vae`` / ``train_transformer`` write at the top of their run folder (``editinfinity train-vae`` /
#: ``train --out``): ``common.save_checkpoint``'s checkpoint and its swap names, ``common.ProgressLog``'s log, the
#: result record and the trained models. A non-empty folder holding none of these is not ours and is refused;
#: ``--overwrite`` removes only a folder holding nothing else. The private names beside these
#: (``.NAME.editinfinity-tmp-HOST-PID-XXXXXX``; ``.checkpoint.tmp`` / ``.old`` of earlier versions) count as ours.
RUN_NAMES = ("checkpoint", ".checkpoint.tmp", ".checkpoint.old", "log.jsonl", "result.json", "vae", "transformer",
             "text_encoder", "tokenizer")


def add_toy_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The driver's options (shared by ``python -m editinfinity.train.toy`` and ``editinfinity train-toy``)."""
    p.add_argument("--out", required=True, help="weights directory to write (the layout load_models reads)")
    p.add_argument("--work", help="training state directory (checkpoints, logs); default OUT.work")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--phase", choices=("all", "vae", "transformer"), default="all",
                   help="run both phases, or one (the transformer phase needs the VAE phase's output)")
    p.add_argument("--vae-minutes", type=float, help="VAE training time (default from the config: 3)")
    p.add_argument("--transformer-minutes", type=float, help="transformer training time (default from the config: 7)")
    p.add_argument("--vae-steps", type=int, help="cap on VAE optimizer steps")
    p.add_argument("--transformer-steps", type=int, help="cap on transformer optimizer steps")
    p.add_argument("--vae-config", default=None, help=f"VAE YAML config (default {VAE_CONFIG.name})")
    p.add_argument("--transformer-config", default=None, help=f"transformer YAML config (default "
                   f"{TRANSFORMER_CONFIG.name})")
    p.add_argument("--vae-set", action="append", metavar="KEY=VALUE", help="override a VAE setting (repeatable)")
    p.add_argument("--transformer-set", action="append", metavar="KEY=VALUE",
                   help="override a transformer setting, e.g. model.depth=4 (repeatable)")
    p.add_argument("--workers", type=int, help="scene-sampling processes per phase (default from the configs)")
    p.add_argument("--vae-from", metavar="DIR",
                   help="use this trained VAE (save_pretrained layout, e.g. presets/toy/vae) instead of training one")
    p.add_argument("--vae-decoder-minutes", type=float, metavar="MIN",
                   help="with --vae-from: fine-tune that VAE's decoder for MIN minutes, encoder frozen (the bit "
                        "codes, and so a transformer trained on them, stay valid)")
    p.add_argument("--init-from", metavar="DIR",
                   help="start the transformer and T5 from this weights directory (e.g. the bundled presets/toy) "
                        "instead of a random initialisation")
    p.add_argument("--check-images", type=int, default=200,
                   help="held-out pictures for the final VAE PSNR check of the exported weights (0: skip)")
    p.add_argument("--resume", action="store_true", help="continue the runs found in --work")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: train finished phases for another budget (--vae-minutes / "
                        "--transformer-minutes more), with a fresh warm-up and cosine cycle")
    p.add_argument("--overwrite", action="store_true", help="remove OUT and --work first (only folders holding nothing but an earlier toy training)")
    p.add_argument("--progress", action="store_true", help="tqdm bars (default: log lines only)")
    return p
