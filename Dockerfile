# syntax=docker/dockerfile:1
# The cmaclip project image: one image for every Airflow component, the Celery workers (CPU and GPU) and
# the MLflow server, so the code a task imports is exactly the code the scheduler parsed.
FROM python:3.11-slim

# Build-time only. PyPI's torch 2.14.1 for x86_64 is the CUDA build (the GPU worker needs it); for a
# CPU-only image pass a CPU wheel index, e.g. --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index>.
ARG TORCH_INDEX_URL=""
ARG AIRFLOW_UID=50000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Pretrained weights are files (local or s3://); a hub lookup from a worker would hang or fail late.
    HF_HUB_OFFLINE=1 \
    AIRFLOW_HOME=/opt/airflow \
    CMACLIP_HOME=/var/lib/cmaclip \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/cmaclip/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/cmaclip/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False

# libgomp: torch's CPU kernels; tini: reaps the task processes a Celery worker forks and forwards
# SIGTERM so a worker shuts down warm instead of being killed mid-task.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cmaclip

# torch first and pinned, in its own layer: it is by far the largest and changes least often.
RUN pip install --upgrade "pip<27" setuptools wheel \
 && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1

# Dependencies before the source, so editing code does not reinstall them.
COPY pyproject.toml constraints.txt README.md ./
COPY cmaclip/__init__.py cmaclip/__init__.py
COPY pipeline/__init__.py pipeline/__init__.py
COPY paper/__init__.py paper/__init__.py
COPY cmaclip/configs cmaclip/configs
# Every package pyproject.toml lists (the sub-packages, and the package-data folders listed as packages)
# must exist for the install; their files are copied below.
RUN python -c "import pathlib, tomllib; [pathlib.Path(*p.split('.')).mkdir(parents=True, exist_ok=True) \
    for p in tomllib.load(open('pyproject.toml', 'rb'))['tool']['setuptools']['packages']]"
# boto3: MLflow's S3 artifact store (the MLflow server proxies artifacts to MinIO/S3 through it).
RUN pip install -c constraints.txt -e ".[airflow]" boto3

# Editable install of the copied tree; the Airflow DAG and plugin folders are the same dags/ and plugins/ the
# tests run (the plugin makes the api-server refuse a trigger whose conf names a param the DAG does not take).
COPY cmaclip cmaclip
COPY pipeline pipeline
COPY paper paper
COPY dags dags
COPY plugins plugins

# Non-root, group 0 (the OpenShift/Airflow convention: any UID in group 0 can write the state folders).
RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir /opt/airflow --create-home --shell /bin/bash airflow \
 && mkdir -p /opt/airflow/logs /opt/airflow/auth /var/lib/cmaclip \
 && chown -R "${AIRFLOW_UID}:0" /opt/airflow /var/lib/cmaclip \
 && chmod -R g+rwX /opt/airflow /var/lib/cmaclip
USER ${AIRFLOW_UID}:0

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "version"]
