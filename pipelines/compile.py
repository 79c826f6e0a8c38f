"""Compile entry point: ``python -m pipelines.compile [--profile NAME ...|--all] [--out DIR] [--no-fused]``.

Writes ``<pipeline>[-fused]-<profile>.yaml`` for the edit and batch pipelines (same as ``editinfinity pipeline
compile``, which compiles one file). Used by ``make compile`` and CI; output is byte-for-byte reproducible.
"""

import argparse
import sys

from editinfinity.errors import EditInfinityError

from . import cli as kfp_cli
from .profiles import load_profiles


def main(argv: list[str] | None = None) -> int:
    """Compile every requested (pipeline, profile, variant); print the paths; exit 2 on a bad profile."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", default=None, help="profile name (repeatable)")
    parser.add_argument("--all", action="store_true", help="every profile, plus the local (no Kubernetes) variant")
    parser.add_argument("--profiles", action="append", default=None, metavar="FILE", help="extra profiles YAML")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused variants")
    parser.add_argument("--out", default="build/pipelines")
    args = parser.parse_args(argv)
    try:
        names = args.profile or []
        if args.all or not names:
            names = [None, *sorted(load_profiles(args.profiles))]
        for profile in names:
            for pipeline in kfp_cli.PIPELINES:
                fusable = pipeline in kfp_cli.FUSED_PIPELINES and not args.no_fused
                for fused in (False, True) if fusable else (False,):
                    print(kfp_cli.compile_pipeline(pipeline, profile, args.out, fused=fused,
                                                   profiles_files=args.profiles))
    except EditInfinityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
