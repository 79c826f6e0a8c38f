"""KFP pipelines of editinfinity: ``edit`` (one image, three modes), ``batch_edit`` (JSONL manifest fan-out) and
``piebench`` (PIE-Bench edits and scores).

All are built by factories because the scheduling profile (``profiles.yaml``) is applied at compile time; compile
with ``editinfinity pipeline compile`` or ``python -m pipelines.compile``.
"""

from editinfinity.edit.modes import MODES

from .batch import BATCH_PIPELINE, make_batch_pipeline
from .edit import EDIT_PIPELINE, make_edit_pipeline
from .piebench import PIEBENCH_PIPELINE, make_piebench_pipeline
from .profiles import Profile, ProfileError, get_profile, load_profiles

__all__ = ["BATCH_PIPELINE", "EDIT_PIPELINE", "MODES", "PIEBENCH_PIPELINE", "Profile", "ProfileError", "get_profile",
           "load_profiles", "make_batch_pipeline", "make_edit_pipeline", "make_piebench_pipeline"]
