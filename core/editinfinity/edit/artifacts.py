"""Stage directories: atomic creation, provenance records and validation between stages.

Each stage writes into a private sibling directory and renames it into place only when every file is written
(:mod:`editinfinity.outputs`), so an interrupted stage (exception, Ctrl-C, SIGTERM or SIGKILL) never leaves a
half-written stage directory under its final name. ``stage.json`` records what made the directory (stage, format and package versions, the case's run id,
settings and timings); later stages refuse directories from another run or an incompatible format.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .. import __version__
from ..errors import StageError
from ..outputs import claim_output

FORMAT = "editinfinity-stage/1"
STAGE_FILE = "stage.json"


def versions() -> dict:
    """The package versions that made an artifact (recorded in ``summary.json`` and ``learned.json``)."""
    import platform

    import diffusers
    import peft
    import torch
    import transformers

    return {"editinfinity": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__, "python": platform.python_version()}


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def stage_output(out_dir: str | os.PathLike, stage: str, *, run_id: str, overwrite: bool = False,
                 settings: dict | None = None, started: float | None = None) -> Iterator[tuple[Path, dict]]:
    """Yield ``(tmp_dir, record)``; on success write ``stage.json`` and publish ``tmp_dir`` as ``out_dir``
    (:func:`editinfinity.outputs.claim_output`: a private folder renamed into place, never over a folder that is
    not ours).

    ``record`` is a dict the caller may extend (metrics, losses); ``seconds`` is filled in automatically: from
    ``started`` (a ``time.perf_counter()`` value taken when the stage's work began) to the end of the writes, or
    the writes alone when it is not given.
    """
    record = {"format": FORMAT, "stage": stage, "editinfinity_version": __version__, "run_id": run_id,
              "settings": settings or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    start = started if started is not None else time.perf_counter()
    with claim_output(out_dir, overwrite=overwrite, what=stage) as tmp:
        yield tmp, record
        record["seconds"] = round(time.perf_counter() - start, 4)
        write_json(tmp / STAGE_FILE, record)


class _Tensors(dict):
    """The tensors of one file; a missing name raises :class:`StageError` instead of ``KeyError``."""

    def __init__(self, data: dict, path: Path, stage: str) -> None:
        super().__init__(data)
        self.path, self.stage = path, stage

    def __missing__(self, key):
        raise StageError(f"{self.path} has no tensor {key!r} (written by another version, or damaged); re-run the "
                         f"{self.stage} stage")


def read_tensors(path: str | os.PathLike, stage: str) -> dict:
    """The tensors of a ``.safetensors`` file of a stage directory; a missing, truncated or corrupt file raises
    :class:`StageError` naming the stage to re-run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} is missing; re-run the {stage} stage")
    try:
        return _Tensors(load_file(str(path)), path, stage)
    except (SafetensorError, OSError, ValueError) as exc:
        raise StageError(f"{path} is truncated or corrupt ({exc}); re-run the {stage} stage") from None


def read_stage(stage_dir: str | os.PathLike | None, stage: str, *, run_id: str | None = None,
               needed_by: str = "this stage") -> dict:
    """Validate a stage directory and return its record; errors say which stage to (re)run."""
    if stage_dir is None:
        raise StageError(f"{needed_by} needs the output of the {stage!r} stage; run it first")
    stage_dir = Path(stage_dir)
    rec_path = stage_dir / STAGE_FILE
    if not rec_path.is_file():
        raise StageError(f"{stage_dir} is not a completed {stage!r} stage directory (no {STAGE_FILE}); "
                         f"run `editinfinity {stage.replace('_', '-')}` to produce it")
    try:
        record = json.loads(rec_path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{rec_path} is corrupt ({exc}); re-run the {stage!r} stage") from exc
    if record.get("format") != FORMAT:
        raise StageError(f"{stage_dir} was written in format {record.get('format')!r} but this editinfinity "
                         f"({__version__}) reads {FORMAT!r}; re-run the {stage!r} stage with this version")
    if record.get("stage") != stage:
        raise StageError(f"{stage_dir} holds the {record.get('stage')!r} stage, but {needed_by} needs {stage!r}; "
                         "check the directory arguments")
    if run_id is not None and record.get("run_id") != run_id:
        raise StageError(f"{stage_dir} belongs to another case (run {record.get('run_id')}, expected {run_id}); "
                         f"re-run the {stage!r} stage for this case")
    return record
