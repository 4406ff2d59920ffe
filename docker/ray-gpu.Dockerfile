# syntax=docker/dockerfile:1
# Ray image for winnow: the head and the GPU workers of docker/compose.yaml; imports winnow's stages.
# Build from the repository root: docker build -f docker/ray-gpu.Dockerfile -t winnow-ray-gpu:0.1.0 .
#
# A plain Python base, not a CUDA one: the torch and DALI wheels carry their own CUDA runtime
# libraries, and the driver comes from the host through the NVIDIA container toolkit. The Python
# minor must equal the Airflow image's (python3.11), or Ray Client refuses the connection.
FROM python:3.11-slim-bookworm

# Keep these equal to docker/airflow.Dockerfile (tests/test_docker_stack.py checks that they match).
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG OPEN_CLIP_VERSION=3.3.0
ARG DALI_VERSION=2.4.0
ARG PYARROW_VERSION=26.0.1
ARG PILLOW_VERSION=13.0.0
ARG SAFETENSORS_VERSION=0.8.0
# torch 2.14 wheels on PyPI are built for CUDA 13.0 (host driver >= 580); point this at a PyTorch
# CUDA 12 wheel index to serve older drivers.
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Same uid and gid as the Airflow image's airflow user, so both sides can write the shared /data.
ARG WINNOW_UID=50000

ENV PYTHONUNBUFFERED=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/home/winnow \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RAY_USAGE_STATS_ENABLED=0 \
    WINNOW_MODEL_DIR=/models

# Group 0 owns and may write HOME and /data, so the container also works under another uid
# (compose's AIRFLOW_UID) as long as the group stays 0, as in the Airflow image.
RUN useradd --uid "${WINNOW_UID}" --gid 0 --home-dir /home/winnow --create-home \
        --shell /bin/bash winnow \
    && mkdir -p /data /models /opt/winnow-src \
    && chown winnow:0 /data /opt/winnow-src \
    && chmod 2775 /data /home/winnow

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# A layer apart from torch (most of the image, changes least) so that stays cached.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir \
        "ray[client,data,default]==${RAY_VERSION}" \
        "nvidia-dali-cuda120==${DALI_VERSION}" \
        "open_clip_torch==${OPEN_CLIP_VERSION}" \
        "pyarrow==${PYARROW_VERSION}" \
        "pillow==${PILLOW_VERSION}" \
        "safetensors==${SAFETENSORS_VERSION}"

COPY pyproject.toml /opt/winnow-src/pyproject.toml
COPY winnow/ /opt/winnow-src/winnow/
COPY operators/ /opt/winnow-src/operators/
# --no-deps: the runtime dependencies are installed above; resolving pyproject's list here would
# also pull apache-airflow into the Ray workers, which never import it. The [gpu] extra
# (nvidia-dali-cuda120) is the DALI pin above.
RUN pip install --no-cache-dir --no-deps /opt/winnow-src \
    && python -c "import winnow, nvidia.dali, open_clip, ray, torch"

USER ${WINNOW_UID}:0
WORKDIR /home/winnow
# compose.yaml gives the role: `ray start --head ...` or `ray start --address=... --block`.
CMD ["ray", "--help"]
