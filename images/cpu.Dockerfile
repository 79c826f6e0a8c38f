# editinfinity CPU image: the CPU pipeline steps (mask, summary, batch manifest and page), the weights Job
# (download + `editinfinity convert`), CPU-only use of the CLI, and every stage of the toy preset. kfp==2.17.3 is
# preinstalled, so components use install_kfp_package=False and pods install nothing at run time. No credentials
# are baked in: object-store access comes from the pod (Workload Identity, IRSA, or a Secret mounted as env vars).
#
# Build from the repository root (the root .dockerignore keeps .venv and outputs out of the context):
#   make images-cpu                      # docker or podman; BASE=local, TORCH_WHEELS=DIR: docs/kubeflow.md
#   docker build -f images/cpu.Dockerfile -t ghcr.io/editinfinity/editinfinity:0.1.0-cpu .
# Build arguments: PYTHON_IMAGE (the base: a python:3.11-slim-bookworm or the Debian-made one of images/base/),
# TORCH_VERSION, TORCH_INDEX_URL (empty: torch from the wheel folder images/wheels/), GIT_REVISION (a label).
# torch is the CPU build (no CUDA libraries), which keeps this image small.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# The dependencies, in a virtual environment copied whole into the final stage (no wheel lands in an image layer):
# torch without its dependencies from the chosen source, then the pinned runtime requirements (torch's own
# dependencies included) without theirs; `pip check` fails the build when a pin is missing or inconsistent.
FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY images/requirements-runtime.txt /tmp/requirements-runtime.txt
COPY images/wheels/ /tmp/wheels/
# hadolint ignore=SC2086
RUN if [ -n "${TORCH_INDEX_URL}" ]; then src="--index-url ${TORCH_INDEX_URL}"; \
    else src="--no-index --find-links /tmp/wheels"; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps ${src} "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps -r /tmp/requirements-runtime.txt \
    && /opt/venv/bin/pip check

# The project as a wheel (its own layer, so a code change does not reinstall the dependencies).
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY components ./components
COPY pipelines ./pipelines
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="editinfinity-cpu" \
      org.opencontainers.image.description="EditInfinity text-guided image editing: CPU runtime for Kubeflow Pipelines" \
      org.opencontainers.image.licenses="MIT"
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
