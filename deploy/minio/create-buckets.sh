#!/bin/sh
# Run by the `minio-init` service (minio/mc image) once MinIO is healthy: create the MLflow artifact
# bucket and the data bucket. Idempotent, so `docker compose up` can run it on every start.
set -eu
mc alias set local "http://minio:9000" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$MLFLOW_BUCKET"
mc mb --ignore-existing "local/$DATA_BUCKET"
echo "buckets ready: $MLFLOW_BUCKET $DATA_BUCKET"
