"""The container images every component runs in: one constant each, derived from the package version.

Override at compile time with ``EDITINFINITY_IMAGE`` / ``EDITINFINITY_CPU_IMAGE`` (read when this module is first
imported), e.g. to point at your own registry. Both images have kfp preinstalled, so components are declared with
``install_kfp_package=False`` and pods never pip-install anything at run time.
"""

from __future__ import annotations

import os

from editinfinity import __version__

REGISTRY = "ghcr.io/editinfinity"
#: CUDA runtime image (images/cuda.Dockerfile): the GPU stages.
GPU_IMAGE = os.environ.get("EDITINFINITY_IMAGE", f"{REGISTRY}/editinfinity:{__version__}-cuda")
#: CPU image (images/cpu.Dockerfile): mask, summary and batch bookkeeping.
CPU_IMAGE = os.environ.get("EDITINFINITY_CPU_IMAGE", f"{REGISTRY}/editinfinity:{__version__}-cpu")
