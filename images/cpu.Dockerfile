# syntax=docker/dockerfile:1
# editinfinity CPU image: the CPU pipeline steps (mask, summary, batch manifest and page), the weights Job
# (download + `editinfinity convert`) and CPU-only use of the CLI. kfp==2.17.3 is preinstalled, so components use
# install_kfp_package=False and pods install nothing at run time. No credentials are baked in: object-store access
# comes from the pod (Workload Identity, IRSA, or a Secret mounted as env vars).
#
# Build from the repository root (images/cpu.Dockerfile.dockerignore keeps .venv and outputs out of the context):
#   docker build -f images/cpu.Dockerfile -t ghcr.io/editinfinity/editinfinity:0.1.0-cpu .
# torch is the CPU build (no CUDA libraries), which keeps this image small.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
# Packaged too once pyproject maps them (the KFP definitions; components run from the compiled YAML).
COPY components ./components
COPY pipelines ./pipelines
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
LABEL org.opencontainers.image.title="editinfinity-cpu" \
      org.opencontainers.image.description="EditInfinity text-guided image editing: CPU runtime for Kubeflow Pipelines" \
      org.opencontainers.image.licenses="MIT"
ENV PYTHONDONTWRITEBYTECODE=1 \
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
COPY images/requirements-runtime.txt /tmp/requirements-runtime.txt
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir -r /tmp/requirements-runtime.txt \
    && rm /tmp/requirements-runtime.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels \
    && python -c "import editinfinity, kfp, torch; assert kfp.__version__ == '2.17.3', kfp.__version__"
USER 1000:1000
WORKDIR /home/app
CMD ["editinfinity", "--help"]
