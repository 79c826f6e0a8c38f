# editinfinity CUDA runtime image: the GPU pipeline stages (prepare, tune-prompt, train-lora, attention, generate,
# fused edit) and the `editinfinity` CLI. kfp==2.17.3 is preinstalled, so components use install_kfp_package=False
# and pods install nothing at run time. No credentials are baked in: object-store access comes from the pod
# (Workload Identity, IRSA, or a Secret mounted as env vars).
#
# Build from the repository root (the root .dockerignore keeps .venv and outputs out of the context):
#   make images-cuda                     # docker or podman; BASE=local: docs/kubeflow.md
#   docker build -f images/cuda.Dockerfile -t ghcr.io/editinfinity/editinfinity:0.1.0-cuda .
# Build arguments: PYTHON_IMAGE (the base), TORCH_VERSION, TORCH_INDEX_URL, GIT_REVISION (a label).
# CUDA version: torch 2.13.0 from PyPI (the default source) is built with CUDA 13.0; its runtime libraries come as
# the nvidia-* wheels pinned in images/requirements-cuda.txt, so the host needs an NVIDIA driver of the R580 branch
# or newer. Another CUDA build (e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128, driver R570+) needs
# that build's nvidia-* pins in images/requirements-cuda.txt; `pip check` in the build says which are missing.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# The dependencies, in a virtual environment copied whole into the final stage (no wheel lands in an image layer):
# torch without its dependencies from the chosen source, then the pinned runtime requirements (torch's own
# dependencies included) without theirs; `pip check` fails the build when a pin is missing or inconsistent.
FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY images/requirements-runtime.txt images/requirements-cuda.txt /tmp/
COPY images/wheels/ /tmp/wheels/
# hadolint ignore=SC2086
RUN if [ -n "${TORCH_INDEX_URL}" ]; then src="--index-url ${TORCH_INDEX_URL}"; \
    else src="--no-index --find-links /tmp/wheels"; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps ${src} "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps -r /tmp/requirements-runtime.txt -r /tmp/requirements-cuda.txt \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import torch; assert torch.version.cuda, 'torch is a CPU build: use a CUDA wheel'"

# The project as a wheel (its own layer, so a code change does not reinstall the dependencies).
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY components ./components
COPY pipelines ./pipelines
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="editinfinity-cuda" \
      org.opencontainers.image.description="EditInfinity text-guided image editing: CUDA runtime for Kubeflow Pipelines" \
      org.opencontainers.image.licenses="MIT" \
      io.editinfinity.cuda="13.0 (torch wheel from PyPI; NVIDIA driver R580 or newer)"
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EDITINFINITY_CACHE=/models \
    HF_HOME=/models/hf
# Non-root user; the model cache (a PVC mounts over /models) and the KFP launcher's local artifact roots
# (/gcs, /s3, /minio) must be writable by it.
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /models/hf /gcs /s3 /minio \
    && chown -R app:app /models /gcs /s3 /minio
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels && pip check \
    && python -c "import editinfinity, kfp, torch; assert kfp.__version__ == '2.17.3', kfp.__version__"
ARG GIT_REVISION=unknown
LABEL org.opencontainers.image.revision="${GIT_REVISION}"
USER 1000:1000
WORKDIR /home/app
CMD ["editinfinity", "--help"]
