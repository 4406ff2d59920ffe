# syntax=docker/dockerfile:1
# Airflow image for winnow: scheduler, api-server, dag-processor and triggerer of docker/compose.yaml.
# Build from the repository root: docker build -f docker/airflow.Dockerfile -t winnow-airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11

# Keep these equal to docker/ray-gpu.Dockerfile: Ray Client refuses a driver whose Ray version or
# Python minor differs from the cluster's, and tests/test_docker_stack.py checks that they match.
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG OPEN_CLIP_VERSION=3.3.0
# CPU wheels: the Airflow side plans, submits and checks; model compute runs on the Ray GPU workers.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Numeric ids (root, then the image's airflow user 50000): hadolint DL3066, and what compose runs.
USER 0
# /data and /opt/airflow/auth are mount points of named volumes. Docker seeds a new named volume
# with the owner and mode of the image folder, so the airflow user (uid 50000, gid 0) and the Ray
# containers (same uid and gid, see ray-gpu.Dockerfile) can both write the run root.
RUN mkdir -p /data /models /opt/airflow/auth /opt/winnow-src \
    && chown airflow:0 /data /opt/airflow/auth /opt/winnow-src \
    && chmod 2775 /data /opt/airflow/auth
USER 50000

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Only what the distribution needs to build; tests, benchmarks and the docker folder stay out.
COPY --chown=airflow:0 pyproject.toml /opt/winnow-src/pyproject.toml
COPY --chown=airflow:0 winnow/ /opt/winnow-src/winnow/
COPY --chown=airflow:0 operators/ /opt/winnow-src/operators/
# apache-airflow is named with the base image's version so pip never up- or downgrades Airflow
# while resolving winnow's dependencies (the practice the Airflow image docs recommend).
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        "ray[client,data,default]==${RAY_VERSION}" \
        "open_clip_torch==${OPEN_CLIP_VERSION}" \
        /opt/winnow-src

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/

ENV WINNOW_MODEL_DIR=/models
