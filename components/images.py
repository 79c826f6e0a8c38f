"""The container images every component runs in: one constant each, derived from the package version.

Override at compile time with ``EDITINFINITY_IMAGE`` / ``EDITINFINITY_CPU_IMAGE`` (read when this module is first
imported), e.g. to point at your own registry, or by digest (``repo@sha256:...``; CI compiles against the digests of
the images it just pushed). Both images have kfp preinstalled, so components are declared with
``install_kfp_package=False`` and pods never pip-install anything at run time.
"""

from __future__ import annotations

import os
import re

from editinfinity import __version__
from editinfinity.errors import EditInfinityError

REGISTRY = "ghcr.io/editinfinity"
_DIGEST = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


def image_reference(variable: str, default: str) -> str:
    """``$variable`` or ``default``. A reference by digest (``repo@sha256:<64 hex>``, what CI compiles against:
    immutable, unlike a tag) is checked for its form, so a truncated digest fails here rather than in every pod."""
    value = os.environ.get(variable) or default
    if "@" in value and not _DIGEST.match(value):
        raise EditInfinityError(f"${variable}={value!r} is not an image reference by digest "
                                "(REPOSITORY@sha256:<64 hex digits>); fix the value or give a tag")
    return value


#: CUDA runtime image (images/cuda.Dockerfile): the GPU stages.
GPU_IMAGE = image_reference("EDITINFINITY_IMAGE", f"{REGISTRY}/editinfinity:{__version__}-cuda")
#: CPU image (images/cpu.Dockerfile): mask, summary and batch bookkeeping.
CPU_IMAGE = image_reference("EDITINFINITY_CPU_IMAGE", f"{REGISTRY}/editinfinity:{__version__}-cpu")
